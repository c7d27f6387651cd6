"""Image preprocessing (and, as it lands, records, shard writers and Grain pipelines)."""
