"""TreeOfLife-200M on Apache Beam (shards/beam.py) against make-shards' process pool (shards/tol200m.py): the same
shard bytes and summaries on a tiny synthetic catalog, shuffled across taxa, and the bad-input lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bioclip_jax.data.records import find_shards, read_records
from bioclip_jax.errors import InputError
from bioclip_jax.shards import TreeOfLife200M, make_shards

SPECIES = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "black-billed magpie"),
           ("Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus", "alba", "white oak"),
           ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria", "")]
RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 5, 8), (10 * i % 256, 40, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _catalog(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A catalog grouped by taxon as the published one (8 images of each of 3 taxa, plus provenance columns) and two
    image files: u-00 is not fetched (missing), u-01 is not an image, u-02 is decoded BGR pixels (pure red), u-03 is
    fetched twice, x-99 has no catalog row."""
    root = tmp_path_factory.mktemp("tol200m")
    rows = [{"uuid": f"u-{8 * s + i:02d}", "source_id": f"gbif-{s}{i}", "data_source": "gbif",
             **dict(zip(RANKS, taxon[:7])), "common": taxon[7] or None}
            for s, taxon in enumerate(SPECIES) for i in range(8)]
    _catalog(root / "catalog.parquet", rows)
    images = [{"uuid": r["uuid"], "image": _jpeg(k), "resized_size": None} for k, r in enumerate(rows) if k]
    images[0]["image"] = b"not an image"
    images[1].update(image=bytes([0, 0, 255]) * 6 * 4, resized_size=[4, 6])
    images += [{"uuid": "u-03", "image": _jpeg(50), "resized_size": None},
               {"uuid": "x-99", "image": _jpeg(51), "resized_size": None}]
    schema = pa.schema([("uuid", pa.string()), ("image", pa.binary()), ("resized_size", pa.list_(pa.int64()))])
    (root / "images").mkdir()
    pq.write_table(pa.Table.from_pylist(images[:12], schema), root / "images" / "data_a.parquet")
    pq.write_table(pa.Table.from_pylist(images[12:], schema), root / "images" / "data_b.parquet")
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.integration  # about 10 s: Beam's import and the DirectRunner's start
def test_beam_direct_runner_writes_the_same_bytes_as_make_shards(published, tmp_path):
    """The Beam pipeline on DirectRunner and the process pool: the same shards, stats and summaries, byte for byte
    (so the same records), with the missing, undecodable and duplicate images counted and named."""
    from bioclip_jax.shards.beam import make_shards_beam

    catalog, images = str(published / "catalog.parquet"), [str(published / "images")]
    local = make_shards(TreeOfLife200M(catalog, images, records_per_shard=8), tmp_path / "local", progress=False,
                        workers=1)
    beam = make_shards_beam(catalog, images, tmp_path / "beam", runner="DirectRunner", records_per_shard=8)
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")
    assert beam.data == local.data
    assert len(find_shards(tmp_path / "beam" / "train")) == 3  # 24 catalog rows / 8
    skipped = local["splits"]["train"]["skipped"]
    assert skipped["reasons"] == {"missing image": 1, "undecodable image": 1, "duplicate id": 1,
                                  "image without row": 1}
    assert {s["name"] for s in skipped["items"]} == {"u-00", "u-01", "u-03", "x-99"}
    assert local["records"] == 22
    assert all(f"{what} 1" in beam.notes[0] for what in ("missing image", "undecodable image", "image without row"))
    assert "records 22" in beam.notes[0]
    records = {r.id: r for r in read_records(find_shards(tmp_path / "beam" / "train"))}
    r, g, b = Image.open(io.BytesIO(records["u-02"].image)).getpixel((0, 0))
    assert r > 240 and g < 15 and b < 15  # the BGR pixels (0, 0, 255) are red, not blue
    assert records["u-17"].taxon.ranks == SPECIES[2][:7] and records["u-09"].taxon.common_name == "white oak"
    # A rerun of a finished output returns its summary without running anything.
    assert make_shards_beam(catalog, images, tmp_path / "beam", records_per_shard=8).data == local.data


def test_records_are_shuffled_across_taxa(published, tmp_path):
    """The catalog is grouped by taxon; no output shard is: every shard mixes taxa, and the output order is not the
    catalog's."""
    catalog, images = str(published / "catalog.parquet"), [str(published / "images")]
    make_shards(TreeOfLife200M(catalog, images, records_per_shard=8), tmp_path, progress=False, workers=1)
    shards = find_shards(tmp_path / "train")
    for shard in shards:
        kingdoms = [r.taxon.ranks[0] for r in read_records([shard])]
        assert len(set(kingdoms)) >= 2, (shard, kingdoms)
    order = [r.id for r in read_records(shards)]
    assert order != sorted(order)
    # Another seed is another order, with the same records.
    make_shards(TreeOfLife200M(catalog, images, records_per_shard=8, seed=1), tmp_path / "s1", progress=False,
                workers=1)
    other = [r.id for r in read_records(find_shards(tmp_path / "s1" / "train"))]
    assert other != order and sorted(other) == sorted(order)


def test_catalog_with_other_columns_is_one_line(published, tmp_path):
    """TreeOfLife-10M's column names (treeoflife_id) or a catalog without ranks: one line naming the file and what
    is missing, before anything is written."""
    from bioclip_jax.shards.beam import make_shards_beam

    rows = pq.read_table(published / "catalog.parquet").rename_columns(
        ["treeoflife_id", "source_id", "data_source", *RANKS, "common"]).to_pylist()
    _catalog(tmp_path / "catalog.parquet", rows)
    with pytest.raises(InputError, match=r"catalog.parquet: missing catalog column\(s\) uuid \(found: treeoflife_id"):
        make_shards_beam(str(tmp_path / "catalog.parquet"), [str(published / "images")], tmp_path / "out")
    _catalog(tmp_path / "ranks.parquet", [{"uuid": "u-00", "species": "alba"}])
    with pytest.raises(InputError, match="missing catalog column.*kingdom, phylum, class/cls, order, family, genus"):
        make_shards(TreeOfLife200M(str(tmp_path / "ranks.parquet"), [str(published / "images")]), tmp_path / "o2",
                    progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def test_image_files_without_image_column_are_one_line(published, tmp_path):
    pq.write_table(pa.table({"uuid": ["u-05"], "url": ["https://example.org/a.jpg"]}), tmp_path / "urls.parquet")
    with pytest.raises(InputError, match=r"urls.parquet: missing image column\(s\) image \(found: uuid, url"):
        make_shards(TreeOfLife200M(str(published / "catalog.parquet"), [str(tmp_path / "urls.parquet")]),
                    tmp_path / "out", progress=False)


def test_cli_runner_and_beam_options(published, tmp_path, capsys):
    """`make-shards tol200m --runner DirectRunner -- <Beam options>` prints the summary with the Beam counters; Beam
    options without --runner are refused."""
    from bioclip_jax.cli import main

    args = ["make-shards", "tol200m", "--catalog", str(published / "catalog.parquet"), "--images",
            str(published / "images" / "*.parquet"), "--records-per-shard", "8"]
    assert main(args + ["--out", str(tmp_path / "o"), "--", "--direct_num_workers", "1"]) == 2
    assert main(args + ["--out", str(tmp_path / "o"), "--runner", "DirectRunner", "--",
                        "--direct_num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "make-shards tol200m: 22 records, 4 skipped" in out and "beam metrics:" in out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["records"] == 22
