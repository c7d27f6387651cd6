"""make-shards tol10m: TreeOfLife-10M as published (image_set_NN.tar.gz of `<treeoflife_id>.jpg` + catalog.csv) ->
ArrayRecord shards. The published layout is rebuilt here in miniature with the catalog's real column names."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bioclip_jax.cli import main
from bioclip_jax.data.records import find_shards, read_records
from bioclip_jax.shards import TreeOfLife10M, make_shards

REPO = Path(__file__).resolve().parents[1]
# The published catalog's columns: the split, the id, the source ids, then the taxonomy.
HEADER = ["split", "treeoflife_id", "eol_content_id", "eol_page_id", "bioscan_part", "bioscan_filename",
          "inat21_filename", "inat21_cls_name", "inat21_cls_num", "kingdom", "phylum", "class", "order", "family",
          "genus", "species", "common"]
MAGPIE = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "black-billed magpie"]
# A missing order, the species as a binomial, no common name.
PICA = ["Animalia", "Chordata", "Aves", "", "Corvidae", "Pica", "Pica pica", ""]
ROSE = ["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina", "dog rose"]
# NaN-like cells as pandas writes them: unknown ranks.
FUNGUS = ["Fungi", "NaN", "nan", "Agaricales", "Amanitaceae", "Amanita", "muscaria", "None"]


def _uuid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


ROWS = ([("train", _uuid(0), "1001", "45511", "", "", "", "", "", *MAGPIE),
         ("train", _uuid(1), "1002", "45512", "", "", "", "", "", *PICA),
         ("val", _uuid(2), "1003", "630", "", "", "", "", "", *ROSE),
         ("train", _uuid(3), "", "", "part1", "x.jpg", "", "", "", *FUNGUS),
         ("train", _uuid(99), "1099", "1", "", "", "", "", "", *MAGPIE)]  # a row without an image
        + [("train", _uuid(i), str(2000 + i), "", "", "", "", "", "", *(MAGPIE if i % 2 else PICA))
           for i in range(4, 10)])
WITHOUT_ROW = _uuid(50)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + i, 12), (20 * i % 256, 100, 200 - 10 * i)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _members() -> list[list[tuple[str, bytes]]]:
    """Two tars: the first with its images inside a folder, the second with an image without a catalog row and a
    repeat of an id of the first tar."""
    first = [(f"image_set_01/{_uuid(i)}.jpg", _jpeg(i)) for i in (0, 1, 2, 4, 5)]
    second = ([(f"{_uuid(i)}.jpg", _jpeg(i)) for i in (3, 6, 7, 8, 9)]
              + [(f"{WITHOUT_ROW}.jpg", _jpeg(50)), (f"{_uuid(0)}.jpg", _jpeg(0)), ("README.txt", b"not an image")])
    return [first, second]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tol10m")
    (root / "dataset" / "EOL").mkdir(parents=True)
    (root / "plain").mkdir()
    (root / "metadata").mkdir()
    for k, members in enumerate(_members(), start=1):
        _write_tar(root / "dataset" / "EOL" / f"image_set_{k:02d}.tar.gz", members)
        _write_tar(root / "plain" / f"image_set_{k:02d}.tar", members)
    with open(root / "metadata" / "catalog.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    return root


def _args(root: Path) -> tuple[str, str]:
    return str(root / "metadata" / "catalog.csv"), str(root / "dataset" / "EOL" / "image_set_*.tar.gz")


def _records(out: Path, split: str) -> dict:
    return {r.id: r for r in read_records(find_shards(out / split))}


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.array_record"))}


def _all_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_records_captions_splits_and_mismatches(published, tmp_path, capsys):
    catalog, images = _args(published)
    out = tmp_path / "out"
    assert main(["make-shards", "tol10m", "--catalog", catalog, "--images", images, "--out", str(out),
                 "--records-per-shard", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "make-shards tol10m: 10 records, 1 skipped" in printed
    assert "1 image(s) without a row (" in printed and f"1 row(s) without an image ({_uuid(99)})" in printed

    train, val = _records(out, "train"), _records(out, "val")
    assert set(val) == {_uuid(2)} and set(train) == {_uuid(i) for i in (0, 1, 3, 4, 5, 6, 7, 8, 9)}
    magpie, pica, rose, fungus = train[_uuid(0)], train[_uuid(1)], val[_uuid(2)], train[_uuid(3)]
    assert magpie.source == "tol10m" and magpie.image == _jpeg(0)  # an RGB JPEG is stored byte for byte
    assert magpie.taxon.text("taxon_com") == ("a photo of Animalia Chordata Aves Passeriformes Corvidae Pica "
                                              "hudsonia with common name black-billed magpie.")
    assert magpie.taxon.text("com") == "a photo of black-billed magpie."
    # Binomial species -> the epithet; the missing order is dropped; no common name -> BioCLIP's fallback.
    assert pica.taxon.ranks == ("Animalia", "Chordata", "Aves", "", "Corvidae", "Pica", "pica")
    assert pica.taxon.common_name == "" and pica.taxon.text("com") == "a photo of Pica pica."
    assert pica.taxon.text("sci_com") == "a photo of Pica pica with common name Pica pica."
    assert pica.taxon.text("taxonTag") == ("a photo of kingdom Animalia phylum Chordata class Aves family Corvidae "
                                           "genus Pica species pica.")
    assert rose.taxon.text("sci") == "a photo of Rosa canina."
    # NaN-like cells are unknown ranks and no common name.
    assert fungus.taxon.ranks == ("Fungi", "", "", "Agaricales", "Amanitaceae", "Amanita", "muscaria")
    assert fungus.taxon.text("com") == "a photo of Amanita muscaria."

    summary = make_shards(TreeOfLife10M(catalog, images), out, records_per_shard=2, workers=1, progress=False)
    tar1, tar2 = sorted(str(p) for p in (published / "dataset" / "EOL").glob("*.tar.gz"))
    cat = summary["catalog"]
    assert cat["rows"] == len(ROWS) and cat["images"] == 12
    assert cat["images_without_row"] == {"count": 1, "first": [f"{tar2}:{WITHOUT_ROW}.jpg"]}
    assert cat["rows_without_image"] == {"count": 1, "first": [_uuid(99)]}
    assert cat["duplicate_row_ids"]["count"] == cat["images_without_split"]["count"] == 0
    assert summary["splits"]["train"]["skipped"]["items"] == [
        {"name": f"{tar2}:{_uuid(0)}.jpg", "reason": "duplicate id", "detail": ""}]
    # Shards never span tars: train has 4 images in tar 1 and 5 in tar 2 -> 2 + 3 shards of at most 2.
    assert [s["records"] for s in summary["splits"]["train"]["shards"]] == [2, 2, 2, 2, 1]
    assert summary["splits"]["train"]["shards"][0]["file"] == "train-00000-of-00005.array_record"
    assert summary["splits"]["val"]["records"] == 1 and summary["records"] == 10
    assert not (out / ".plan").exists()

    # Two workers stream the two tars in parallel: the same bytes.
    two = make_shards(TreeOfLife10M(catalog, images), tmp_path / "two", records_per_shard=2, workers=2,
                      progress=False)
    assert _shards(tmp_path / "two") == _shards(out) and two["splits"] == summary["splits"]


KILL = """
import os, signal, sys
from bioclip_jax.shards import TreeOfLife10M, build, make_shards
encode, seen = build.encode_image, [0]
def encode_then_die(*args, **kwargs):
    seen[0] += 1
    if seen[0] == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as a killed job or a lost machine
    return encode(*args, **kwargs)
build.encode_image = encode_then_die
make_shards(TreeOfLife10M(sys.argv[1], sys.argv[2]), sys.argv[3], records_per_shard=2, resize=16, workers=1,
            progress=False)
"""


@pytest.mark.integration  # kills a subprocess
def test_kill_9_then_rerun_gives_the_same_bytes(published, tmp_path):
    catalog, images = _args(published)
    kw = dict(records_per_shard=2, resize=16, workers=1, progress=False)
    reference = make_shards(TreeOfLife10M(catalog, images), tmp_path / "ref", **kw)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL, catalog, images, str(out), "7"], env=env)
    assert killed.returncode == -9
    # Killed inside tar 2: tar 1's shards are finished, one shard of tar 2 is left half written.
    assert len(list(out.rglob("*.array_record"))) == 3 and list(out.rglob("*.partial"))
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("*.array_record")}
    again = make_shards(TreeOfLife10M(catalog, images), out, **kw)
    assert _all_bytes(out) == _all_bytes(tmp_path / "ref") and again == reference
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not rewritten
    assert make_shards(TreeOfLife10M(catalog, images), out, **kw) == reference  # done: recognised at once
    with pytest.raises(ValueError, match="differs in: resize"):
        make_shards(TreeOfLife10M(catalog, images), out, **{**kw, "resize": 32})


def test_parquet_catalog_and_uncompressed_tars(published, tmp_path):
    catalog, images = _args(published)
    reference = make_shards(TreeOfLife10M(catalog, images), tmp_path / "ref", records_per_shard=3, workers=1,
                            progress=False)
    # Parquet as TreeOfLife-200M ships it: typed columns, nulls where the CSV had empty cells.
    table = pcsv.read_csv(catalog, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    assert table["eol_content_id"].type == pa.int64() and table["common"].null_count > 0
    pq.write_table(table, tmp_path / "catalog.parquet")
    from_parquet = make_shards(TreeOfLife10M(tmp_path / "catalog.parquet", images), tmp_path / "parquet",
                               records_per_shard=3, workers=1, progress=False)
    assert _shards(tmp_path / "parquet") == _shards(tmp_path / "ref")
    assert from_parquet["splits"] == reference["splits"]
    assert {k: v for k, v in from_parquet["catalog"].items() if k != "file"} == \
        {k: v for k, v in reference["catalog"].items() if k != "file"}

    plain = make_shards(TreeOfLife10M(catalog, str(published / "plain")), tmp_path / "plain", records_per_shard=3,
                        workers=1, progress=False)
    assert _shards(tmp_path / "plain") == _shards(tmp_path / "ref") and plain["records"] == reference["records"]


def test_catalog_without_id_column_is_a_one_line_error(published, tmp_path, capsys):
    bad = tmp_path / "catalog.csv"
    bad.write_text("split,uuid,kingdom,phylum,class,order,family,genus,species,common\n"
                   "train,x,Animalia,,,,,,,\n")
    images = _args(published)[1]
    with pytest.raises(ValueError, match=rf"{bad}: missing catalog column\(s\) treeoflife_id \(found: split, uuid"):
        make_shards(TreeOfLife10M(bad, images), tmp_path / "out", progress=False)
    assert main(["make-shards", "tol10m", "--catalog", str(bad), "--images", images,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "treeoflife_id" in err and "Traceback" not in err


def test_repeated_rows_empty_splits_and_catalog_without_split(published, tmp_path):
    images = _args(published)[1]
    rows = [list(r) for r in ROWS]
    rows.insert(1, ["val", _uuid(0), "", "", "", "", "", "", "", *ROSE])  # a repeated id: the first row wins
    rows[2][0] = "nan"  # _uuid(1): no split, so not placed
    with open(tmp_path / "catalog.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    summary = make_shards(TreeOfLife10M(tmp_path / "catalog.csv", images), tmp_path / "out", workers=1,
                          progress=False)
    cat = summary["catalog"]
    assert cat["duplicate_row_ids"] == {"count": 1, "first": [_uuid(0)]}
    tar1 = sorted(str(p) for p in (published / "dataset" / "EOL").glob("*.tar.gz"))[0]
    assert cat["images_without_split"] == {"count": 1, "first": [f"{tar1}:image_set_01/{_uuid(1)}.jpg"]}
    assert _records(tmp_path / "out", "train")[_uuid(0)].taxon.genus == "Pica" and summary["records"] == 9

    rows[3][0] = "../val"
    with open(tmp_path / "bad_split.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    with pytest.raises(ValueError, match=r"bad_split.csv: split value\(s\) '../val' cannot name an output folder"):
        make_shards(TreeOfLife10M(tmp_path / "bad_split.csv", images), tmp_path / "bad", workers=1, progress=False)

    # A catalog without a split column: everything goes to train, and the summary says so.
    with open(tmp_path / "nosplit.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER[1:]] + [r[1:] for r in ROWS])
    summary = make_shards(TreeOfLife10M(tmp_path / "nosplit.csv", images), tmp_path / "nosplit", workers=1,
                          progress=False)
    assert list(summary["splits"]) == ["train"] and summary["records"] == 10
    assert summary["catalog"]["absent_columns"] == ["split"]
