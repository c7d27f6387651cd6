"""No image or record silently lost: one image loader with the same rules everywhere (pixel limit, bit depth, EXIF),
shards checked when they open, record versions checked in every pipeline, unreadable training records replaced and
counted (and a run with too many stopped), undecodable evaluation images skipped and reported."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import struct
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.data import pipeline, transforms
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.data.transforms import Preprocess, load_image
from bioclip_jax.errors import InputError
from bioclip_jax.shards.build import Skip, encode_image
from bioclip_jax.train.skipped_records import SkippedRecords

MAGPIE = Taxon.from_ranks(["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"],
                          "black-billed magpie")


@pytest.fixture(scope="module")
def tiny():
    return bioclip_jax.create_model("tiny")


def _gradient(h=40, w=56) -> np.ndarray:
    """A 16-bit grayscale ramp covering the whole range."""
    return (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


def _jpeg(rng, h=40, w=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bomb(path, width=20000, height=20000):
    """A valid 1-bit PNG of width x height black pixels, streamed through zlib (never held in memory): ~50 KB on disk
    for 400 megapixels, the kind of file a decompression-bomb guard exists for."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sixteen = _gradient()
    Image.fromarray(sixteen).save(folder / "sixteen.png")  # PIL writes uint16 as a 16-bit grayscale PNG
    Image.fromarray(np.rint(sixteen / 257).astype(np.uint8)).save(folder / "eight.png")
    for name in ("good1.jpg", "good2.jpg"):
        (folder / name).write_bytes(_jpeg(rng))
    _png_bomb(folder / "bomb.png")
    return folder


# ------------------------------------------------------------------------------------------------------- bit depth
def test_sixteen_bit_png_is_scaled_like_its_eight_bit_version(images, tiny):
    loaded = load_image(images / "sixteen.png")
    assert loaded.mode == "L"
    eight = np.asarray(Image.open(images / "eight.png"))
    assert np.abs(np.asarray(loaded).astype(int) - eight).max() <= 1
    pixels = Preprocess(size=32)(loaded)
    assert np.abs(pixels - Preprocess(size=32)(Image.open(images / "eight.png"))).max() < 0.05
    white = Preprocess(size=32)(Image.new("RGB", (56, 40), (255, 255, 255)))
    assert np.abs(pixels - white).mean() > 1.0  # not the white image PIL's own conversion gives
    # The public encode path, from a file and from an in-memory 16-bit PIL image.
    feats = bioclip_jax.encode(tiny, images=[str(images / "sixteen.png"), str(images / "eight.png"),
                                             Image.open(images / "sixteen.png"), Image.new("RGB", (56, 40), "white")])
    assert feats[0] @ feats[1] > 0.999 and feats[2] @ feats[1] > 0.999
    assert feats[0] @ feats[3] < feats[0] @ feats[1] - 1e-4
    # make-shards converts with the same function
    stored = Image.open(io.BytesIO(encode_image((images / "sixteen.png").read_bytes())))
    assert np.abs(np.asarray(stored.convert("L")).astype(int) - eight).max() <= 3


def test_float_images_are_scaled(tmp_path):
    values = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(20, 30)
    Image.fromarray(values, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(values * 255, mode="F").save(tmp_path / "bytes.tif")
    expected = np.rint(values * 255)
    for name in ("unit.tif", "bytes.tif"):
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "L" and np.abs(np.asarray(loaded) - expected).max() <= 1, name
    in_memory = Image.fromarray(values, mode="F")
    assert np.abs(np.asarray(Preprocess(size=20, resize_mode="squash")(in_memory))
                  - Preprocess(size=20, resize_mode="squash")(Image.fromarray(expected.astype(np.uint8)))).max() < 0.05


def test_exif_orientation_is_not_applied_as_in_open_clip(tmp_path):
    """open_clip and pybioclip open images with Image.open + convert("RGB"), no exif_transpose: pixels as stored."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (60, 30)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB")))


# --------------------------------------------------------------------------------------------- decompression bombs
def test_a_decompression_bomb_is_refused_per_image(images, tiny):
    bomb = str(images / "bomb.png")
    assert (images / "bomb.png").stat().st_size < 200_000
    with pytest.raises(transforms.ImageTooLarge, match=r"bomb.png: 20000x20000 image \(400,000,000 pixels\) is over "
                                                       r"the limit of 89,478,485 pixels"):
        load_image(bomb)
    # predict: the others still classified, the bomb reported with the limit
    from bioclip_jax.inference.classify import CustomLabelsClassifier, embed_images

    good = [str(images / "good1.jpg"), str(images / "good2.jpg")]
    classifier = CustomLabelsClassifier(["magpie", "raven"], model_str=tiny, progress=False)
    rows = classifier.predict([good[0], bomb, good[1]])
    assert list(dict.fromkeys(r["file_name"] for r in rows)) == good
    assert list(classifier.failures) == [bomb] and "over the limit of 89,478,485 pixels" in classifier.failures[bomb]
    # embed: the images that load are embedded, the bomb reported
    keys, features, failures = embed_images(tiny, [good[0], bomb], progress=False)
    assert keys == good[:1] and len(features) == 1 and list(failures) == [bomb]
    # encode raises, naming the image and the limit; the good images encode on their own
    with pytest.raises(InputError, match="bomb.png: 20000x20000 image .* over the limit"):
        bioclip_jax.encode(tiny, images=[good[0], bomb])
    assert bioclip_jax.encode(tiny, images=good).shape == (2, tiny.config.embed_dim)
    # make-shards skips it with its own reason
    with pytest.raises(Skip) as skip:
        encode_image((images / "bomb.png").read_bytes())
    assert skip.value.reason == "image too large" and "20000x20000" in skip.value.detail


def test_the_pixel_limit_is_one_configurable_threshold(tmp_path, monkeypatch, recwarn):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "small.png")  # 1,600 pixels
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(transforms.ImageTooLarge, match="40x40 image .* over the limit of 1,000 pixels"):
        load_image(tmp_path / "small.png")  # refused, not only warned about, even just over the limit
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setenv(transforms.MAX_IMAGE_PIXELS_ENV, "1599")
    with pytest.raises(transforms.ImageTooLarge, match="over the limit of 1,599 pixels"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv(transforms.MAX_IMAGE_PIXELS_ENV, "1600")
    assert load_image(tmp_path / "small.png").size == (40, 40)
    monkeypatch.setenv(transforms.MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match="BIOCLIP_JAX_MAX_IMAGE_PIXELS='lots'"):
        load_image(tmp_path / "small.png")
    # bioclip_jax's limit replaces PIL's (which warns, then raises at twice its own): 0 = no limit
    monkeypatch.setenv(transforms.MAX_IMAGE_PIXELS_ENV, "0")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert load_image(tmp_path / "small.png").size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 500  # PIL's own setting restored
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------------------------------------- shards
def _write_shard(path, rng, count, bad=None):
    """`bad`: {index: record bytes} replacing the good record at that index."""
    bad = bad or {}
    with ShardWriter(path) as writer:
        for i in range(count):
            writer.write(bad[i] if i in bad else Record(f"{path.stem}-{i}", _jpeg(rng), MAGPIE, "test",
                                                        label="magpie"))
    return path


def _with_version(record: Record, version: int) -> bytes:
    obj = msgpack.unpackb(record.to_bytes(), raw=False)
    obj["v"] = version
    return msgpack.packb(obj, use_bin_type=True)


def _train(data, **kw):
    args = dict(global_batch_size=8, image_size=32, seed=3, process_index=0, process_count=1)
    return pipeline.train_dataset(data, **{**args, **kw})


def _eval(data, **kw):
    return list(pipeline.eval_batches(data, batch_size=kw.pop("batch_size", 8), preprocess=Preprocess(size=32),
                                      process_index=0, process_count=1, **kw))


@pytest.mark.parametrize("damage,message", [
    (lambda data: b"", "empty file \\(0 bytes\\)"),
    (lambda data: data[:len(data) // 2], "not a readable ArrayRecord file \\(\\d+ bytes; truncated"),
    (lambda data: data[:-100], "not a readable ArrayRecord file \\(\\d+ bytes, not a whole number of 64 KiB "
                               "blocks; truncated"),
    (lambda data: b"not an array record" * 10, "190 bytes, smaller than any ArrayRecord file"),
    (lambda data: data[:1000] + b"\0" * (len(data) - 1000), "not a readable ArrayRecord file"),
])
def test_a_damaged_shard_is_named_when_the_source_opens(tmp_path, damage, message):
    rng = np.random.default_rng(0)
    _write_shard(tmp_path / "a-00000.array_record", rng, 5)
    bad = _write_shard(tmp_path / "a-00001.array_record", rng, 20)
    bad.write_bytes(damage(bad.read_bytes()))
    for open_it in (lambda: _train(tmp_path), lambda: _eval(tmp_path), lambda: pipeline.open_source([str(bad)])):
        with pytest.raises(InputError, match=f"shard {bad}: {message}"):
            open_it()


def test_a_missing_shard_in_a_list_is_named(tmp_path):
    good = _write_shard(tmp_path / "a.array_record", np.random.default_rng(0), 3)
    with pytest.raises(InputError, match=f"shard {tmp_path / 'b.array_record'}: no such file"):
        pipeline.open_source([str(good), str(tmp_path / "b.array_record")])


def test_newer_record_versions_are_refused_in_train_and_eval(tmp_path):
    rng = np.random.default_rng(1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shard = _write_shard(mixed / "m.array_record", rng, 12,
                         bad={5: _with_version(Record("future", _jpeg(rng), MAGPIE), 2)})
    with pytest.raises(InputError, match=f"{shard} record 5: record format version 2 is newer than this "
                                         f"bioclip_jax reads \\(1\\)"):
        it = iter(_train(mixed, global_batch_size=4))
        for _ in range(6):  # two epochs of 12: record 5 comes up
            next(it)
    with pytest.raises(InputError, match=f"{shard} record 5: record format version 2"):
        _eval(mixed)
    # a shard that starts with one is refused before anything runs
    newer = tmp_path / "newer"
    newer.mkdir()
    first = _write_shard(newer / "n.array_record", rng, 3,
                         bad={0: _with_version(Record("future", _jpeg(rng), MAGPIE), 7)})
    with pytest.raises(InputError, match=f"shard {first} record 0: record format version 7"):
        pipeline.open_source(newer)


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """2 shards, 32 records: record 3 of shard 0 holds bytes that are not an image, record 6 of shard 1 is not a
    record at all."""
    folder = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(2)
    _write_shard(folder / "d-00000.array_record", rng, 16, bad={3: Record("broken", b"not a jpeg", MAGPIE).to_bytes()})
    _write_shard(folder / "d-00001.array_record", rng, 16, bad={6: b"\xc1garbage"})
    return folder


def test_unreadable_training_records_are_replaced_and_counted(damaged_shards):
    batches, it = [], iter(_train(damaged_shards))
    for _ in range(8):  # two epochs
        batches.append(next(it))
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    assert sum(b["skipped"] for b in batches) == 4  # each bad record once per epoch
    named = " ".join(m for b in batches for m in b["skipped_records"])
    assert "d-00000.array_record record 3 (id 'broken'): cannot decode image" in named
    assert "d-00001.array_record record 6: not a bioclip_jax record (FormatError)" in named
    # the replacements depend on (seed, position) only: 2 processes see the same global batches
    hosts = [list(zip(range(8), _train(damaged_shards, process_index=p, process_count=2))) for p in range(2)]
    for step in range(8):
        together = sorted(x.tobytes() for p in range(2) for x in hosts[p][step][1]["image"])
        assert together == sorted(x.tobytes() for x in batches[step]["image"])
    # and a resumed iterator continues exactly
    fresh = iter(_train(damaged_shards))
    for _ in range(3):
        next(fresh)
    state = fresh.get_state()
    resumed = iter(_train(damaged_shards))
    resumed.set_state(state)
    for step in range(3, 8):
        assert np.array_equal(next(resumed)["image"], batches[step]["image"])


def test_skipped_records_are_bounded():
    counter = SkippedRecords(0.1, global_batch_size=8)
    counter.add({"skipped": 1, "skipped_records": ["a.array_record record 1: bad"]})
    assert counter.check() == 1  # one is always tolerated
    counter.add({"skipped": 0, "skipped_records": []})
    counter.add({"skipped": 2, "skipped_records": ["b.array_record record 2: bad", "c"]})
    with pytest.raises(InputError, match=r"3 of the 24 training examples .*data.max_skipped_fraction=0.1\); first: "
                                         r"a.array_record record 1: bad \| b.array_record record 2: bad \| c"):
        counter.check()
    strict = SkippedRecords(0.0, global_batch_size=8)
    strict.add({"skipped": 1, "skipped_records": ["a.array_record record 1: bad"]})
    with pytest.raises(InputError, match="1 of the 8 training examples"):
        strict.check()


@pytest.mark.integration  # two short training runs
def test_training_counts_skipped_records_and_stops_above_the_threshold(damaged_shards, tmp_path):
    from bioclip_jax.train.config import load_config
    from bioclip_jax.train.trainer import train

    config = load_config(bioclip_jax_tests_config(), [f"data.train={damaged_shards}", "train.steps=4",
                                                      "data.max_skipped_fraction=0.1"])
    train(config, tmp_path / "run", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [m["data/skipped_records"] for m in logged if "data/skipped_records" in m]
    assert len(counts) == 4 and counts == sorted(counts) and counts[-1] == 4  # 2 epochs: each bad record twice
    config = load_config(bioclip_jax_tests_config(), [f"data.train={damaged_shards}", "train.steps=4",
                                                      "data.max_skipped_fraction=0.01"])
    with pytest.raises(InputError, match=r"2 of the \d+ training examples read so far could not be read .*"
                                         r"data.max_skipped_fraction=0.01.*array_record record \d"):
        train(config, tmp_path / "strict", progress=False)


def bioclip_jax_tests_config():
    from pathlib import Path

    return Path(__file__).parent / "configs" / "tiny_train.py"


# ------------------------------------------------------------------------------------------------------ evaluation
def test_eval_skips_and_reports_undecodable_images(damaged_shards, tiny, tmp_path, caplog):
    from bioclip_jax.evaluate.zero_shot import embed_eval_set

    batches = _eval(damaged_shards, batch_size=5)
    assert sum(int(b["mask"].sum()) for b in batches) == 30
    assert sum(len(b["failed"]) for b in batches) == 2
    failures = []
    with caplog.at_level(logging.WARNING):
        features, ranks, labels, _ = embed_eval_set(tiny, damaged_shards, batch_size=5, failures=failures)
    assert features.shape[0] == len(labels) == 30
    assert len(failures) == 2 and "skipped 2 image(s)" in caplog.text and "record 3 (id 'broken')" in caplog.text

    # `bioclip-jax eval` on a folder with one undecodable image: it runs, and names the image
    from bioclip_jax.cli import main

    task = tmp_path / "tasks" / "my_set"
    task.mkdir(parents=True)
    rng = np.random.default_rng(3)
    with open(task / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "class", "genus", "species"])
        for i in range(6):
            (task / f"{i}.jpg").write_bytes(_jpeg(rng) if i != 2 else b"truncated")
            species = ["Pica hudsonia", "Corvus corax"][i % 2]
            writer.writerow([f"{i}.jpg", species, *species.split()])
    model_dir = tmp_path / "model"
    bioclip_jax.save_model(tiny, model_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--model", str(model_dir), "--tasks", str(tmp_path / "tasks"), "--templates", "single",
                     "--out", str(tmp_path / "out")]) == 0
    assert "skipped 1 image(s)" in caplog.text and "2.jpg" in caplog.text
    results = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert results["my_set"]["images"] == 5


def test_an_empty_image_array_is_refused_by_position(tiny):
    """A 0x0 array would divide by its zero side when resized: a ValueError naming the image, not ZeroDivisionError."""
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match=r"^image 1: a 0x0 image has no pixels$"):
        bioclip_jax.encode(tiny, images=[good, np.zeros((0, 0, 3), np.uint8)])
    with pytest.raises(InputError, match="image 0: a 5x0 image has no pixels"):
        bioclip_jax.encode(tiny, images=[Image.new("RGB", (5, 0))])


@pytest.fixture(scope="module")
def open_clip_folder(tiny, tmp_path_factory):
    from bioclip_jax.convert.checkpoint import export_open_clip

    return export_open_clip(tiny, tmp_path_factory.mktemp("weights") / "open_clip", write_bin=False)


def _damaged_copy(folder, tmp_path, damage):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def _edit_config(edit):
    def damage(folder):
        path = folder / "open_clip_config.json"
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg))
    return damage


def _edit_tensors(edit):
    from safetensors.numpy import load_file, save_file

    def damage(folder):
        path = str(folder / "open_clip_model.safetensors")
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return damage


def _truncate(fraction):
    def damage(folder):
        path = folder / "open_clip_model.safetensors"
        path.write_bytes(path.read_bytes()[:int(path.stat().st_size * fraction)])
    return damage


@pytest.mark.parametrize("damage,message", [
    (_edit_tensors(lambda t: t.update({"visual.proj": np.zeros((3, 3), np.float32)})),
     r"/damaged: the weights do not match the config: 1 wrong shapes: visual.proj: got \(3, 3\), expected \(64, 64\)$"),
    (_truncate(0.5), r"open_clip_model.safetensors: not a readable safetensors file"),
    (_truncate(0), r"open_clip_model.safetensors: not a readable safetensors file"),
    (_edit_config(lambda c: c["model_cfg"].update(embed_dim="64")),
     r"/damaged: model config: embed_dim='64': expected a positive integer$"),
    (_edit_config(lambda c: c["model_cfg"]["vision_cfg"].update(layers=0)),
     r"/damaged: model config vision_cfg: layers=0: expected a positive integer$"),
    (_edit_config(lambda c: c["model_cfg"].update(quick_gelu="false")),
     r"/damaged: model config: quick_gelu='false': expected true or false$"),
    (_edit_config(lambda c: c.update(model_cfg=[1])),
     r"/damaged: model config: expected an object of fields, got list"),
    (_edit_config(lambda c: c["preprocess_cfg"].update(mean="x")),
     r"/damaged: preprocess_cfg: mean='x': expected three numbers, one per RGB channel$"),
    (_edit_config(lambda c: c["preprocess_cfg"].update(std=[0.2, 0.0, 0.2])),
     r"std=\[0.2, 0.0, 0.2\]: expected three positive"),
], ids=["mis-shaped tensor", "truncated safetensors", "empty safetensors", "string for a number", "zero layers",
        "string for a flag", "list for the config", "string for the mean", "zero std"])
def test_a_damaged_model_folder_is_one_line_naming_file_and_key(open_clip_folder, tmp_path, capsys, damage, message):
    from bioclip_jax import cli

    folder = _damaged_copy(open_clip_folder, tmp_path, damage)
    assert cli.main(["convert", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.search(message, err.strip()), err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("argv,message", [
    (["embed", "--model", "bioclip2", "{image}"], r"bioclip2: no such file or folder, and not a model name \(bioclip, "
                                                    r"bioclip-2 or hf-hub:ORG/NAME\); did you mean 'bioclip-2'\?$"),
    (["convert", "{folder}", "{image}"], r"ok.png: a file is in the way; expected a folder"),
    (["make-txt-emb", "{taxa}", "--model", "{folder}", "--out", "{image}"], r"ok.png: a file is in the way"),
], ids=["mistyped model name", "convert onto a file", "make-txt-emb onto a file"])
def test_wrong_paths_are_one_line(open_clip_folder, tmp_path, capsys, monkeypatch, argv, message):
    from bioclip_jax import cli

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "taxa.csv").write_text("kingdom,phylum,class,order,family,genus,species,common_name\n"
                                       "Animalia,Chordata,Aves,Passeriformes,Corvidae,Pica,hudsonia,magpie\n")
    names = dict(image=str(tmp_path / "ok.png"), folder=str(open_clip_folder), taxa=str(tmp_path / "taxa.csv"))
    assert cli.main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err.strip()), err


def test_grayscale_and_one_pixel_images_are_embedded(tiny):
    features = bioclip_jax.encode(tiny, images=[np.zeros((1, 1), np.uint8), np.full((20, 30), 128, np.uint8)])
    assert features.shape == (2, tiny.config.embed_dim) and np.isfinite(features).all()
