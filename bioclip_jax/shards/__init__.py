"""Offline dataset preparation (make-shards): raw images and taxonomy -> ArrayRecord shards of records
(docs/data_format.md). A layer above `data`, whose record format it writes; training never imports it.

    from bioclip_jax.shards import TreeOfLifeTars, make_shards
    summary = make_shards(TreeOfLifeTars("data/shard-{000000..000003}.tar"), "shards/tol", resize=224)
    print(summary.report())

- `build`: the one path from a raw example to record bytes (`build_record`), for make-shards and any other writer;
- `source`: what a source provides (`Source`, `Plan`); one module per source: `treeoflife` (webdataset tars),
  `tol10m` (TreeOfLife-10M as published: catalog + gzip tars), `tol200m` (TreeOfLife-200M: catalog.parquet + the
  downloaded image Parquet files), `folder` (metadata.csv), `synthetic`;
- `beam`: `make_shards_beam`, the same TreeOfLife-200M records on Apache Beam (Dataflow, Flink, Spark, DirectRunner);
- `output`: the output folder (manifest, atomic shards, per-shard stats, summaries, `Summary`);
- `pool`: worker processes and their progress; `make`: `make_shards`, the plan -> shards -> summary run.
"""

from bioclip_jax.shards.folder import MetadataFolder
from bioclip_jax.shards.make import make_shards
from bioclip_jax.shards.output import Summary
from bioclip_jax.shards.synthetic import SyntheticTree
from bioclip_jax.shards.tol10m import TreeOfLife10M
from bioclip_jax.shards.tol200m import TreeOfLife200M
from bioclip_jax.shards.treeoflife import TreeOfLifeTars

__all__ = ["MetadataFolder", "Summary", "SyntheticTree", "TreeOfLife10M", "TreeOfLife200M", "TreeOfLifeTars",
           "make_shards"]
