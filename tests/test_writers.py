"""make-shards: TreeOfLife tars, image folders and the synthetic tree of life -> ArrayRecord shards of Records.
Every input is made here, tiny; one run with two workers checks that the output does not depend on the pool."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.cli import main
from bioclip_jax.data.records import find_shards, read_records
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.shards import MetadataFolder, SyntheticTree, TreeOfLifeTars, make_shards, treeoflife
from bioclip_jax.shards.build import Example, build_record
from bioclip_jax.shards.source import is_val

MAGPIE = Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "black-billed magpie")
NO_ORDER = Taxon("Animalia", "Chordata", "Aves", "", "Corvidae", "Pica", "pica")  # missing rank, no common name
ROSE = Taxon("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina", "dog rose")
TOL_EXTS = ("scientific_name", "taxonomic_name", "common_name", "sci", "com", "taxon", "taxonTag", "sci_com",
            "taxon_com", "taxonTag_com")


def _jpeg(colour, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tol_sample(taxon: Taxon) -> dict[str, bytes]:
    """The eleven members BioCLIP's make_wds.py wrote per image (common_name.txt falls back like Taxon.common)."""
    texts = {"scientific_name": taxon.scientific_name, "taxonomic_name": taxon.taxonomic_name,
             "common_name": taxon.common}
    texts.update({t: taxon.text(t) for t in TOL_EXTS[3:]})
    return {f"{ext}.txt": texts[ext].encode() for ext in TOL_EXTS}


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tol_tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tol")
    good = _jpeg((200, 30, 30))
    first = [("magpie", {"jpg": good, **_tol_sample(MAGPIE)}),
             ("noorder", {"jpg": _jpeg((30, 200, 30)), **_tol_sample(NO_ORDER)}),
             ("corrupt", {"jpg": good[:len(good) // 2], **_tol_sample(MAGPIE)}),  # truncated JPEG
             ("notaxon", {"jpg": good})]
    # No taxonTag files: the positional fallback of taxonomic_name.txt.
    notag = {k: v for k, v in _tol_sample(ROSE).items() if not k.startswith("taxonTag")}
    second = [("rose", {"jpg": _jpeg((30, 30, 200)), **notag})]
    second += [(f"bird{i:02d}", {"jpg": _jpeg((10 * i, 100, 50)), **_tol_sample(MAGPIE if i % 2 else NO_ORDER)})
               for i in range(12)]
    _write_tar(root / "shard-000000.tar", first)
    _write_tar(root / "shard-000001.tar", second)
    return root


def _records(out: Path, split: str) -> dict:
    return {r.id: r for r in read_records(find_shards(out / split))}


def _all_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_treeoflife_records_summary_and_worker_independence(tol_tars, tmp_path):
    pattern = str(tol_tars / "shard-{000000..000001}.tar")
    one = make_shards(TreeOfLifeTars(pattern, val_fraction=0.25), tmp_path / "w1", records_per_shard=4, workers=1,
                      progress=False)
    two = make_shards(TreeOfLifeTars(str(tol_tars), val_fraction=0.25), tmp_path / "w2", records_per_shard=4,
                      workers=2, progress=False)
    # Same plan from a brace pattern and from the folder, whatever the number of workers: the same shard bytes.
    shards = lambda out: {k: v for k, v in _all_bytes(out).items() if k.endswith(".array_record")}  # noqa: E731
    assert shards(tmp_path / "w1") == shards(tmp_path / "w2") and len(shards(tmp_path / "w1")) >= 3
    assert one["splits"] == two["splits"]

    records = {**_records(tmp_path / "w1", "train"), **_records(tmp_path / "w1", "val")}
    assert set(records) == {"magpie", "noorder", "rose"} | {f"bird{i:02d}" for i in range(12)}
    for split in ("train", "val"):  # the split is the seeded hash of the id
        assert all(is_val(0, i, 0.25) == (split == "val") for i in _records(tmp_path / "w1", split))
    assert records["magpie"].taxon == MAGPIE and records["magpie"].source == "treeoflife"
    noorder = records["noorder"].taxon
    assert noorder.ranks == ("Animalia", "Chordata", "Aves", "", "Corvidae", "Pica", "pica")  # placed by taxonTag
    assert noorder.common_name == "" and noorder.text("com") == "a photo of Pica pica."  # BioCLIP's fallback
    assert records["rose"].taxon == ROSE  # no taxonTag: positional taxonomic_name
    assert records["magpie"].image == _jpeg((200, 30, 30))  # an RGB JPEG is stored byte for byte
    assert Image.open(io.BytesIO(records["rose"].image)).mode == "RGB"

    assert one["records"] == 15 and one["skipped"] == 2
    skipped = {s["name"]: s["reason"] for info in one["splits"].values() for s in info["skipped"]["items"]}
    tar0 = str(tol_tars / "shard-000000.tar")
    assert skipped == {f"{tar0}:corrupt.jpg": "undecodable image", f"{tar0}:notaxon.jpg": "no taxonomy"}
    train = one["splits"]["train"]
    assert train["records"] == sum(s["records"] for s in train["shards"]) == len(_records(tmp_path / "w1", "train"))
    assert train["shards"][0]["file"] == f"train-00000-of-{len(train['shards']):05d}.array_record"
    kingdoms = {k: one["splits"]["train"]["kingdoms"].get(k, 0) + one["splits"]["val"]["kingdoms"].get(k, 0)
                for k in ("Animalia", "Plantae")}
    assert kingdoms == {"Animalia": 14, "Plantae": 1}


def test_resume_finishes_only_missing_shards_with_the_same_bytes(tol_tars, tmp_path):
    out = tmp_path / "out"
    kw = dict(records_per_shard=3, workers=1, progress=False)
    tars = TreeOfLifeTars(str(tol_tars), val_fraction=0.25)
    first = make_shards(tars, out, **kw)
    before = _all_bytes(out)
    victim = out / "train" / first["splits"]["train"]["shards"][1]["file"]
    others = [p for p in out.rglob("*.array_record") if p != victim]
    mtimes = {p: p.stat().st_mtime_ns for p in others}
    victim.unlink()
    (out / "train" / "summary.json").unlink()
    Path(f"{victim}.partial").write_bytes(b"half a shard from a killed run")
    again = make_shards(tars, out, **kw)
    assert _all_bytes(out) == before and again == first
    assert {p: p.stat().st_mtime_ns for p in others} == mtimes  # finished shards were not rewritten
    assert not list(out.rglob("*.partial"))
    # A finished run is recognised at once; other settings are refused rather than mixed into the folder.
    assert make_shards(tars, out, **kw) == first
    with pytest.raises(ValueError, match="differs in: seed"):
        make_shards(TreeOfLifeTars(str(tol_tars), val_fraction=0.25, seed=1), out, **kw)


def _image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_folder_modes_missing_file_and_labels(tmp_path):
    root = tmp_path / "rare"
    (root / "images").mkdir(parents=True)
    grey16 = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    assert grey16.mode == "I;16"
    palette = Image.new("P", (20, 30), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    images = {"cmyk.jpg": _image_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
              "rgba.png": _image_bytes(Image.new("RGBA", (30, 20), (200, 10, 10, 128)), "PNG"),
              "la.png": _image_bytes(Image.new("LA", (30, 20), (90, 255)), "PNG"),
              "palette.png": _image_bytes(palette, "PNG"),
              "grey.jpg": _image_bytes(Image.new("L", (30, 20), 128), "JPEG"),
              "grey16.png": _image_bytes(grey16, "PNG"),
              "truncated.jpg": _jpeg((1, 2, 3), (64, 64))[:300]}
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    columns = ["filepath", "class", "kingdom", "phylum", "cls", "order", "family", "genus", "species", "common_name"]
    rows = [[f"images/{name}", f"class {i}", "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica",
             "Pica hudsonia", "black-billed magpie" if i % 2 else "Pica hudsonia"] for i, name in enumerate(images)]
    rows.append(["images/missing.jpg", "class x", "Animalia", "", "", "", "", "", "", ""])
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns] + rows)

    summary = make_shards(MetadataFolder(root / "metadata.csv", val_fraction=0.0), tmp_path / "out", resize=16,
                          progress=False)
    assert list(summary["splits"]) == ["train"]
    records = _records(tmp_path / "out", "train")
    assert sorted(records) == sorted(f"images/{n}" for n in images if n != "truncated.jpg")
    for i, name in enumerate(images):
        if name == "truncated.jpg":
            continue
        r = records[f"images/{name}"]
        img = Image.open(io.BytesIO(r.image))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 16)), name
        assert r.label == f"class {i}" and r.source == "folder"
        assert r.taxon.ranks == MAGPIE.ranks  # "Pica hudsonia" in the species column -> the epithet
        assert r.taxon.common_name == ("black-billed magpie" if i % 2 else "")
    grey = np.asarray(Image.open(io.BytesIO(records["images/grey16.png"].image)))
    assert abs(int(grey.mean()) - 40000 // 257) <= 2  # 16-bit scaled to 8 bits, not clipped to white
    cmyk = np.asarray(Image.open(io.BytesIO(records["images/cmyk.jpg"].image))).mean(axis=(0, 1))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK (0, 255, 255, 0) is red
    skipped = {s["name"]: s["reason"] for s in summary["splits"]["train"]["skipped"]["items"]}
    assert skipped == {"images/truncated.jpg": "undecodable image", "images/missing.jpg": "missing image"}
    assert summary["splits"]["train"]["skipped"]["reasons"] == {"undecodable image": 1, "missing image": 1}


def test_folder_missing_columns_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "metadata.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"missing required column\(s\) filepath, class \(found: path, label"):
        make_shards(MetadataFolder(tmp_path / "metadata.csv"), tmp_path / "out", progress=False)
    assert main(["make-shards", "folder", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bioclip-jax make-shards: error:" in err and "filepath, class" in err and "Traceback" not in err


class FakeTree:
    """The SyntheticTreeOfLife interface: iter_examples("seen" / "heldout") -> (id, PIL image, Taxon)."""

    def __init__(self, n_seen=5, n_heldout=1, per_species=4):
        self.taxa = {"seen": [Taxon("Animalia", "P", "C", "O", "F", f"Genus{i}", f"sp{i}", f"bug {i}")
                              for i in range(n_seen)],
                     "heldout": [Taxon("Fungi", "P", "C", "O", "F", "Held", f"out{i}") for i in range(n_heldout)]}
        self.per_species = per_species

    def iter_examples(self, split):
        for j, taxon in enumerate(self.taxa[split]):
            for k in range(self.per_species):
                yield f"{split}/{j}/{k}", Image.new("RGB", (8, 8), (40 * j, 20 * k, 0)), taxon


def test_synthetic_splits(tmp_path):
    summary = make_shards(SyntheticTree(generator=FakeTree(), val_per_species=1), tmp_path / "out",
                          records_per_shard=6, progress=False)
    assert {s: i["records"] for s, i in summary["splits"].items()} == {"train": 15, "val": 5, "heldout": 4}
    val = _records(tmp_path / "out", "val")
    assert sorted(r.taxon.genus for r in val.values()) == [f"Genus{i}" for i in range(5)]  # one per seen species
    heldout = _records(tmp_path / "out", "heldout")
    assert {r.taxon.kingdom for r in heldout.values()} == {"Fungi"} and len(heldout) == 4
    assert all(r.source == "synthetic" for r in heldout.values())
    # The records are build_record's, so another writer calling it (e.g. a Beam pipeline) writes the same bytes.
    built = {i: build_record(Example(i, image, taxon), source="synthetic")
             for i, image, taxon in FakeTree().iter_examples("heldout")}
    assert {i: r.to_bytes() for i, r in heldout.items()} == built
    assert not list((tmp_path / "out").glob(".synthetic.spool"))
    assert summary["splits"]["train"]["kingdoms"] == {"Animalia": 15}


def test_synthetic_cli_with_the_real_generator(tmp_path, capsys):
    pytest.importorskip("bioclip_jax.data.synthetic")
    out = tmp_path / "syn"
    assert main(["make-shards", "synthetic", "--out", str(out), "--n-species", "8", "--images-per-species", "3",
                 "--image-size", "16", "--heldout-fraction", "0.5", "--resize", "24"]) == 0
    assert "make-shards synthetic: 24 records, 0 skipped" in capsys.readouterr().out
    train, val, heldout = (_records(out, s) for s in ("train", "val", "heldout"))
    assert len(train) + len(val) + len(heldout) == 24 and len(heldout) == 12 and len(val) == 8
    assert all(Image.open(io.BytesIO(r.image)).size == (24, 24) for r in train.values())
    assert not set(r.taxon for r in heldout.values()) & set(r.taxon for r in train.values())


def test_parsers():
    assert treeoflife.expand_braces("d/shard-{000008..000011}.tar") == [f"d/shard-{i:06d}.tar" for i in range(8, 12)]
    assert treeoflife.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert treeoflife.parse_tagged("a photo of kingdom Animalia class Aves genus Pica species Pica hudsonia.") == [
        "Animalia", "", "Aves", "", "", "Pica", "hudsonia"]
    assert treeoflife.parse_tagged("Animalia Chordata") is None
    # Without taxonTag, genus and epithet come from the scientific name, higher ranks are filled from kingdom.
    assert treeoflife.parse_positional("Animalia Chordata Aves Pica hudsonia", "Pica hudsonia") == [
        "Animalia", "Chordata", "Aves", "", "", "Pica", "hudsonia"]
    assert treeoflife.parse_positional("Animalia Chordata Aves Pica hudsonia", "") == [
        "Animalia", "Chordata", "Aves", "", "", "Pica", "hudsonia"]
    assert treeoflife.parse_positional("Fungi Basidiomycota", "") == ["Fungi", "Basidiomycota", "", "", "", "", ""]
    taxon = treeoflife.treeoflife_taxon({"taxonomic_name.txt": "Animalia Chordata Aves",
                                         "common_name.txt": "Animalia Chordata Aves"})
    assert taxon.cls == "Aves" and taxon.common_name == ""  # the taxonomic-name fallback is not a common name
    with pytest.raises(FileNotFoundError, match="no tar files"):
        treeoflife.find_tars("/nonexistent/shard-{000000..000001}.tar")
