"""Image-text pairs from WebDataset tars and Parquet (a replay stream): item for item what tarfile and pyarrow read,
the same replay batches as ArrayRecord shards of the same pairs, and one named line for bad input."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bioclip_jax.data import pipeline
from bioclip_jax.data.pair_sources import ParquetPairSource, TarPairSource
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.train.config import load_config

PAIRS = 7  # 4 in the first tar, 3 in the second
PNG = b"\x89PNG"


def _image(n: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(n).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _pairs() -> list[tuple[str, bytes, str]]:
    """(key, image, caption), as img2dataset names them (shard number + index), two of them over the 100 characters
    of a plain tar header, one caption not ASCII."""
    return [(f"{'long/' * 20 if n in (2, 6) else ''}{n // 4:05d}{n % 4:04d}", _image(n, "PNG" if n == 5 else "JPEG"),
             f"a photo of thing {n}{' (Pica pica, pie bavarde, Elster: ä é)' if n == 3 else ''}") for n in range(PAIRS)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder: Path) -> Path:
    """Two tars as img2dataset writes them (jpg, txt and json per key; one png), plus a key without a caption and
    one without an image in the second, and img2dataset's metadata Parquet beside each tar."""
    folder.mkdir(parents=True)
    pairs = _pairs()
    for shard, chunk in enumerate((pairs[:4], pairs[4:])):
        # long names: GNU's in the first tar, pax records (POSIX) in the second
        with tarfile.open(folder / f"{shard:05d}.tar", "w", format=(tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)[shard]) \
                as tar:
            for key, image, caption in chunk:
                _add(tar, f"{key}.{'png' if image.startswith(PNG) else 'jpg'}", image)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", b'{"url": "https://example.org"}')
            if shard:
                _add(tar, "00019998.jpg", _image(98))
                _add(tar, "00019999.txt", b"a caption without its image")
        pq.write_table(pa.table({"key": [k for k, _, _ in chunk]}), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return folder


def read_tars_plainly(paths: list[Path]) -> list[tuple[bytes, str]]:
    """The straightforward reading: every member with tarfile, grouped by key, pairs with an image and a caption."""
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            groups: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out += [(g.get("jpg", g.get("png")), g["txt"].decode()) for g in groups.values()
                if ("jpg" in g or "png" in g) and "txt" in g]
    return out


def write_parquet(path: Path, hf_image: bool = False, caption: str = "caption") -> Path:
    """The pairs in two row groups (5 + 4 rows), one row with a null caption, one without image bytes; `hf_image`:
    Hugging Face's Image struct {bytes, path} in an "image" column, else img2dataset's "jpg" binary column."""
    pairs = _pairs() + [("00019998", None, "a caption without its image"), ("00019999", _image(99), None)]
    images = [p[1] for p in pairs]
    column = (pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())])) if hf_image else pa.array(images))
    table = pa.table({"key": [p[0] for p in pairs], "image" if hf_image else "jpg": column,
                      caption: pa.array([p[2] for p in pairs], pa.string())})
    pq.write_table(table, path, row_group_size=5)
    return path


def read_parquet_plainly(path: Path, image: str, caption: str) -> list[tuple[bytes, str]]:
    rows = pq.read_table(path).to_pylist()
    value = (lambda r: r[image]["bytes"]) if image == "image" else (lambda r: r[image])
    return [(value(r), r[caption]) for r in rows if r[caption] and value(r)]


def _pixels(data: bytes) -> bytes:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()


def _items(source) -> list[tuple[bytes, str]]:
    return [(_pixels(source[i]["image"]), source[i]["text"]) for i in range(len(source))]


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    return write_tars(tmp_path_factory.mktemp("pairs") / "laion")


def test_tar_pairs_are_what_tarfile_reads(tars, caplog):
    with caplog.at_level(logging.WARNING):
        source = pipeline.open_source(tars)  # the folder: tars, img2dataset's metadata Parquet left out
    assert isinstance(source, TarPairSource) and len(source) == PAIRS and source.counts == [4, 3]
    expected = read_tars_plainly(sorted(tars.glob("*.tar")))
    assert _items(source) == [(_pixels(image), caption) for image, caption in expected]
    record = source[5]
    assert record["id"] == "000010001" and record["ranks"] == ("",) * 7 and record["source"] == "webdataset"
    assert source.where(5) == f"{tars / '00001.tar'} pair 1"
    assert source[2]["id"] == f"{tars / '00000.tar'} pair 2"  # a key too long for its plain header: named by place
    # the incomplete keys are counted, named in one warning for their tar, and left out
    assert dict(source.skipped) == {"without an image (.jpg/.jpeg/.png/.webp)": 1, "without a caption (.txt)": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{tars / '00001.tar'}: skipped 2 of 5 pairs (1 without an image (.jpg/.jpeg/.png/.webp), "
                        f"1 without a caption (.txt)), e.g. key '00019999'"]
    # a glob and a list give the same source; pickled (as to Grain's workers, after reading) it reads the same
    assert _items(pipeline.open_source(str(tars / "*.tar"))) == _items(source)
    assert _items(pickle.loads(pickle.dumps(source))) == _items(source)  # open files are left behind


def test_parquet_pairs_are_what_pyarrow_reads(tmp_path):
    plain = write_parquet(tmp_path / "img2dataset.parquet")
    source = pipeline.open_source(plain)
    assert isinstance(source, ParquetPairSource) and len(source) == PAIRS
    assert _items(source) == [(_pixels(i), c) for i, c in read_parquet_plainly(plain, "jpg", "caption")]
    assert source[5]["id"] == "000010001" and source.where(6) == f"{plain} row 6"
    assert dict(source.skipped) == {"without image bytes (jpg)": 1, "without a caption (caption)": 1}
    # Hugging Face's Image struct, a caption column named by config, and a folder of files
    folder = tmp_path / "hf"
    folder.mkdir()
    hf = write_parquet(folder / "train-00000.parquet", hf_image=True, caption="alt_text")
    with pytest.raises(InputError, match=f"{hf}: no caption column \\(caption, txt, text\\) holding text "
                                         f"\\(columns: key, image, alt_text\\); name it with "
                                         f"--config.replay.caption_column=NAME"):
        pipeline.open_source(folder)
    source = pipeline.open_source(folder, caption_column="alt_text")
    assert _items(source) == [(_pixels(i), c) for i, c in read_parquet_plainly(hf, "image", "alt_text")]
    assert _items(pickle.loads(pickle.dumps(source))) == _items(source)
    assert _items(pipeline.open_source([hf], image_column="image.bytes", caption_column="alt_text")) == _items(source)
    config = load_config("bioclip_jax/configs/bioclip2_vitl14.py", ["replay.caption_column=alt_text"])
    assert config.replay.caption_column == "alt_text" and config.replay.image_column == ""


def _shards_of(pairs: list[tuple[bytes, str]], folder: Path) -> Path:
    folder.mkdir()
    with ShardWriter(folder / "s-00000.array_record") as writer:
        for n, (image, caption) in enumerate(pairs):
            writer.write(Record(str(n), image, Taxon.from_ranks([""] * 7), text=caption))
    return folder


def _replay_batches(data, steps: int = 4) -> list[tuple[bytes, bytes, int]]:
    iterator = iter(pipeline.replay_dataset(data, rows_per_batch=3, image_size=16, seed=3, process_index=0,
                                            process_count=1))
    return [(b["image"].tobytes(), b["tokens"].tobytes(), b["passes"]) for b in (next(iterator) for _ in range(steps))]


def test_replay_from_tars_and_parquet_is_replay_from_shards_of_the_same_pairs(tars, tmp_path):
    shards = _shards_of(read_tars_plainly(sorted(tars.glob("*.tar"))), tmp_path / "shards")
    expected = _replay_batches(shards)
    assert [b[2] for b in expected] == [0, 0, 1, 1]  # 7 pairs, 3 a step: the source cycles
    assert _replay_batches(tars) == expected  # same pairs in the same order: the same shuffle, crops and captions
    assert _replay_batches(write_parquet(tmp_path / "pairs.parquet")) == expected


def _bad_tars(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        _add(tar, "a.jpg", _image(0))
        _add(tar, "a.txt", b"a caption")
    paths = {"not": folder / "not.tar", "cut": folder / "cut.tar", "gz": folder / "x.tar.gz"}
    paths["not"].write_bytes(b"this is not a tar file" * 40)
    paths["cut"].write_bytes(good.getvalue()[:1200])
    paths["gz"].write_bytes(b"")
    return paths


def test_bad_input_is_one_named_line(tars, tmp_path):
    bad = _bad_tars(tmp_path / "bad")
    with pytest.raises(InputError, match=f"^{bad['not']}: not a tar file \\(.*\\); expected a WebDataset tar of "
                                         "image-text pairs \\(uncompressed"):
        pipeline.open_source([bad["not"]])
    with pytest.raises(InputError, match=f"^{bad['cut']}: truncated tar \\(member a.jpg ends at byte"):
        pipeline.open_source([bad["cut"]])
    with pytest.raises(InputError, match="x.tar.gz: a compressed tar cannot be read by offset; decompress it"):
        pipeline.open_source(str(bad["gz"]))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.tar").write_bytes((tars / "00000.tar").read_bytes())
    (mixed / "b.array_record").write_bytes(b"")
    with pytest.raises(InputError, match=f"^folder {mixed} holds 1 .array_record, 1 .tar files: expected one kind "
                                         "\\(ArrayRecord shards \\(.array_record\\), WebDataset tars \\(.tar\\) or "
                                         "Parquet files \\(.parquet\\)\\)$"):
        pipeline.open_source(mixed)
    with pytest.raises(InputError, match="the list of data files mixes .parquet, .tar files: expected one kind"):
        pipeline.open_source([mixed / "a.tar", tars / "00000.parquet"])
    unknown = tmp_path / "jpegs"
    unknown.mkdir()
    (unknown / "a.jpg").write_bytes(_image(0))
    with pytest.raises(InputError, match=f"^folder {unknown} holds none of ArrayRecord shards .*\\(found: .jpg\\)$"):
        pipeline.open_source(unknown)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["https://example.org/a.jpg"], "caption": ["a"]}), urls)
    with pytest.raises(InputError, match=f"^{urls}: no image column \\(jpg, jpeg, png, webp, image, img\\) holding "
                                         "image bytes \\(columns: url, caption; a column of URLs must be fetched"):
        pipeline.open_source(urls)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=f"^{fake}: not a Parquet file \\("):
        pipeline.open_source(fake)
