"""embed and predict at scale: inputs (folders, quoted globs, listings with carried columns, shards), Parquet parts in
emb-explorer's layout read back with pyarrow, the other formats, resume after kill -9, two hosts (gloo) giving the
union of one, and predict over a 100,000-class bank with top-k on the device."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import main
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError
from bioclip_jax.inference.inputs import collect_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(model folder, image folder with 11 JPEGs in subfolders, the loaded model)."""
    base = tmp_path_factory.mktemp("scale")
    model = bioclip_jax.create_model("tiny")
    folder = bioclip_jax.export_open_clip(model, base / "model", write_bin=False)
    rng = np.random.default_rng(0)
    for i in range(11):
        path = base / "images" / f"d{i % 3}" / f"im{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(path)
    return Path(str(folder)), base / "images", bioclip_jax.load(folder)


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def _read(path) -> pa.Table:
    return pq.read_table(path)


def test_folders_globs_and_listings_expand(data, tmp_path):
    _, images, _ = data
    every = _images(images)
    assert collect_inputs([str(images)]).refs == every
    assert collect_inputs([f"{images}/**/*.jpg"]).refs == every
    assert collect_inputs([f"{images}/d1/*.jpg"]).refs == [p for p in every if "/d1/" in p]
    (tmp_path / "list.txt").write_text("\n".join(os.path.relpath(p, tmp_path) for p in every[:2]) + "\n\n")
    assert collect_inputs([str(tmp_path / "list.txt")]).refs == every[:2]  # relative to the listing's folder
    (tmp_path / "list.csv").write_text(f"Image_Path,uuid,site\n{every[0]},007,north\n{every[1]},8,south\n")
    listed = collect_inputs([str(tmp_path / "list.csv")])
    assert listed.ids == ["007", "8"] and listed.columns == {"site": ["north", "south"]}
    pq.write_table(pa.table({"file_path": every[:2], "count": [3, 4]}), tmp_path / "list.parquet")
    assert collect_inputs([str(tmp_path / "list.parquet")]).columns == {"count": [3, 4]}


@pytest.mark.parametrize("content,message", [
    ("name,site\na.jpg,x\n", r"list.csv: no path column \(columns: name, site\); name it one of path, file_path"),
    ("path,id\na.jpg,1\nb.jpg,1\n", r"duplicate ids: '1' \(1 repeats\)"),
    ("path,emb\na.jpg,1\n", r"column\(s\) emb would clash"),
])
def test_bad_listings_are_one_line(tmp_path, content, message):
    import re

    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(InputError) as raised:
        collect_inputs([str(tmp_path / "list.csv")])
    assert re.search(message, str(raised.value)) and "\n" not in str(raised.value)


def test_empty_folder_and_glob_are_refused(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="a folder without images"):
        collect_inputs([str(tmp_path)])
    with pytest.raises(InputError, match=r"\*\*/\*.jpg: no images"):
        collect_inputs([f"{tmp_path}/**/*.jpg"])


def test_parquet_parts_schema_values_and_resume(data, tmp_path, capsys):
    folder, images, model = data
    (images.parent / "bad").mkdir(exist_ok=True)
    (images.parent / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    listing = tmp_path / "list.csv"
    every = _images(images)
    listing.write_text("path,uuid,site\n" + "".join(f"{p},id{i},s{i % 2}\n" for i, p in enumerate(every))
                       + f"{images.parent / 'bad' / 'broken.jpg'},idbad,s9\n")
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(listing), "--model", str(folder), "--output", str(out), "--part-size", "4",
            "--batch-size", "3", "--quiet"]
    assert main(argv) == 1  # one unreadable file: reported, the rest embedded
    assert "broken.jpg" in capsys.readouterr().err
    table = _read(out)
    assert table.schema.field("uuid").type == pa.string() and table.schema.field("file_name").type == pa.string()
    assert table.schema.field("emb").type == pa.list_(pa.float32()) and table.column_names == [
        "uuid", "emb", "file_name", "site"]
    assert table.column("uuid").to_pylist() == [f"id{i}" for i in range(len(every))]
    expected = bioclip_jax.encode(model, images=every, preprocess="pybioclip")  # normalised by default
    np.testing.assert_allclose(np.stack(table.column("emb").to_numpy(zero_copy_only=False)), expected, atol=1e-6)
    assert (out / "_failures.csv").read_text().splitlines()[1].startswith(str(images.parent / "bad" / "broken.jpg"))
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]

    stamp = (out / "part-00001.parquet").stat().st_mtime_ns
    assert main(argv) == 1  # a rerun: every part finished, nothing redone
    assert (out / "part-00001.parquet").stat().st_mtime_ns == stamp
    assert "0 images done in 0 parts (3 parts finished before)" in capsys.readouterr().err

    other = bioclip_jax.export_open_clip(bioclip_jax.create_model("tiny", seed=1), tmp_path / "other",
                                         write_bin=False)
    assert main([*argv[:3], str(other), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds another model's parts" in err and str(out) in err


def test_other_formats_and_refusals(data, tmp_path, capsys):
    folder, images, model = data
    every = _images(images)[:5]
    base = ["embed", *every, "--model", str(folder), "--quiet", "--batch-size", "2", "--part-size", "2"]
    assert main([*base, "--output", str(tmp_path / "e.npy"), "--float16"]) == 0
    matrix = np.load(tmp_path / "e.npy")
    assert matrix.dtype == np.float16 and matrix.shape == (5, model.config.embed_dim)
    expected = bioclip_jax.encode(model, images=every, preprocess="pybioclip")
    np.testing.assert_allclose(matrix, expected, atol=2e-3)
    assert (tmp_path / "e.ids.csv").read_text().splitlines()[1] == f"{every[0]},{every[0]}"
    assert not (tmp_path / "e.npy.parts").exists()  # the parts folder goes once the file is written
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"x")
    assert main(["embed", *every, str(broken), *base[len(every) + 1:], "--output", str(tmp_path / "e.csv"),
                 "--raw"]) == 1
    assert (tmp_path / "e.failures.csv").read_text().splitlines()[1].startswith(f"{broken},")
    header = (tmp_path / "e.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["uuid", "file_name", "emb_0"] and len(header) == 2 + model.config.embed_dim
    raw = bioclip_jax.encode(model, images=every, preprocess="pybioclip", normalize=False)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "e.csv", delimiter=",", skiprows=1,
                                          usecols=range(2, len(header))), raw, atol=1e-6)
    for bad in ("e.txt", "e"):
        assert main([*base, "--output", str(tmp_path / bad)]) == 2
        assert "the suffix chooses the format; expected one of .parquet, .npy, .csv, .json" in capsys.readouterr().err
    assert main(["embed", str(broken), "--model", str(folder), "--output", str(tmp_path / "none.json")]) == 1
    assert not (tmp_path / "none.json").exists()  # every input failed: no empty output file
    assert str(broken) in (tmp_path / "none.json.parts" / "_failures.csv").read_text()


def _shards(folder: Path, images: list[str], per_shard: int = 4) -> Path:
    folder.mkdir()
    for s in range(0, len(images), per_shard):
        with ShardWriter(folder / f"train-{s // per_shard:05d}.array_record") as writer:
            for i, path in enumerate(images[s:s + per_shard]):
                taxon = Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", f"sp{s + i}")
                writer.write(Record(id=f"rec{s + i}", image=Path(path).read_bytes(), taxon=taxon, source="test"))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.mark.integration  # two processes
def test_two_hosts_embed_the_union_of_one(data, tmp_path):
    folder, images, _ = data
    shards = _shards(tmp_path / "shards", _images(images))
    common = ["embed", str(shards), "--model", str(folder), "--part-size", "2", "--batch-size", "2", "--quiet"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bioclip_jax.cli", *common, "--output",
                               str(tmp_path / "two.parquet"), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    assert main([*common, "--output", str(tmp_path / "one.parquet")]) == 0
    one, two = _read(tmp_path / "one.parquet"), _read(tmp_path / "two.parquet")
    assert sorted(two.column("uuid").to_pylist()) == sorted(one.column("uuid").to_pylist()) == \
        sorted(f"rec{i}" for i in range(11))  # each id once
    by_id = dict(zip(two.column("uuid").to_pylist(), two.column("emb").to_pylist()))
    np.testing.assert_allclose([by_id[i] for i in one.column("uuid").to_pylist()],
                               one.column("emb").to_pylist(), atol=1e-6)
    assert one.column("species").to_pylist()[:2] == ["sp0", "sp1"] and set(one.column("genus").to_pylist()) == {"Pica"}


@pytest.mark.integration  # a process with 8 devices
def test_embed_and_predict_over_8_devices_equal_one(data, tmp_path):
    """The CLI on a host of 8 (fake) devices: each batch split over them by the mesh encoder, the class bank split
    along its classes; the same rows and embeddings as the one-device run of this process."""
    folder, images, _ = data
    bank = _bank(tmp_path / "bank", 64, 1_003)  # a class count that does not divide by 8: the bank is padded
    jobs = {"emb": ["embed", str(images), "--model", str(folder), "--batch-size", "8", "--part-size", "5"],
            "pred": ["predict", str(images), "--model", str(folder), "--txt-emb", str(bank), "--rank", "family",
                     "--k", "3", "--batch-size", "8"]}
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    for name, argv in jobs.items():
        proc = subprocess.run([sys.executable, "-m", "bioclip_jax.cli", *argv, "--quiet", "--output",
                               str(tmp_path / f"{name}8.parquet")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert main([*argv, "--quiet", "--output", str(tmp_path / f"{name}1.parquet")]) == 0
    eight, one = _read(tmp_path / "emb8.parquet"), _read(tmp_path / "emb1.parquet")
    assert eight.column("uuid").to_pylist() == one.column("uuid").to_pylist() and eight.num_rows == 11
    np.testing.assert_allclose(eight.column("emb").to_pylist(), one.column("emb").to_pylist(), atol=1e-5)
    eight, one = _read(tmp_path / "pred8.parquet").to_pylist(), _read(tmp_path / "pred1.parquet").to_pylist()
    assert len(one) == 33 and [{k: v for k, v in r.items() if k != "score"} for r in eight] == \
        [{k: v for k, v in r.items() if k != "score"} for r in one]
    np.testing.assert_allclose([r["score"] for r in eight], [r["score"] for r in one], rtol=1e-4)


@pytest.mark.integration  # kills a process
def test_kill_9_then_rerun_equals_an_uninterrupted_run(data, tmp_path):
    folder, images, _ = data
    # 33 items in 11 parts; larger images so that parts take long enough to kill the run between two of them.
    rng = np.random.default_rng(1)
    for i in range(22):
        Image.fromarray(rng.integers(0, 256, (700, 600, 3), dtype=np.uint8)).save(tmp_path / f"big{i:02d}.jpg")
    argv = ["embed", str(images), f"{tmp_path}/big*.jpg", "--model", str(folder), "--part-size", "3",
            "--batch-size", "3", "--quiet"]
    out = tmp_path / "resumed.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "bioclip_jax.cli", *argv, "--output", str(out)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "_done").glob("part-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "_done").glob("*.json")))
    assert 0 < finished < 11, f"{finished} parts finished before the kill"
    assert main([*argv, "--output", str(out)]) == 0
    assert main([*argv, "--output", str(tmp_path / "straight.parquet")]) == 0
    resumed, straight = _read(out), _read(tmp_path / "straight.parquet")
    assert resumed.column("uuid").to_pylist() == straight.column("uuid").to_pylist()
    assert resumed.column("emb").to_pylist() == straight.column("emb").to_pylist()  # bit for bit
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _bank(folder: Path, dim: int, classes: int) -> Path:
    """A pybioclip species folder of `classes` random species in 50 families."""
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((dim, classes)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=0, keepdims=True)
    folder.mkdir()
    np.save(folder / "txt_emb_species.npy", matrix)
    names = [[["Animalia", "Chordata", "Aves", f"O{c % 7}", f"F{c % 50}", f"G{c % 500}", f"s{c}"], f"bird {c}"]
             for c in range(classes)]
    (folder / "txt_emb_species.json").write_text(json.dumps(names))
    return folder


def test_predict_100k_classes_top_k_on_device(data, tmp_path, monkeypatch):
    from bioclip_jax.inference import classify
    from bioclip_jax.inference.predict_job import ClassBank, predict_job
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier

    folder, images, model = data
    every = _images(images)[:4]
    classes = 100_000
    classifier = TreeOfLifeClassifier(model, txt_emb=_bank(tmp_path / "bank", model.config.embed_dim, classes),
                                      progress=False)
    expected = {rank: classifier.predict(every, rank, k=3, batch_size=4) for rank in ("species", "family")}

    def no_host_scores(*args, **kwargs):
        raise AssertionError("scores computed on the host")

    monkeypatch.setattr(classify, "zero_shot_probabilities", no_host_scores)
    peaks = []

    def traced(bank, *args, **kwargs):  # host memory while a batch is scored (the first call also compiles)
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        out = top_k(bank, *args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1] - start)
        return out

    top_k = ClassBank.top_k
    monkeypatch.setattr(ClassBank, "top_k", traced)
    tracemalloc.start()
    try:
        summary = predict_job(classifier, collect_inputs(every), str(tmp_path / "species.parquet"), k=3,
                              batch_size=2, progress=False)
    finally:
        tracemalloc.stop()
    assert summary.total_rows == 12 and len(peaks) == 2
    assert peaks[1] < 2 * classes * 4 // 2  # less than half of one batch's [2, C] float32 scores ever on the host
    predict_job(classifier, collect_inputs(every), str(tmp_path / "family.parquet"), rank="family", k=3,
                batch_size=4, progress=False)
    for rank in ("species", "family"):
        rows = _read(tmp_path / f"{rank}.parquet").to_pylist()
        assert [{k: v for k, v in r.items() if k not in ("uuid", "score")} for r in rows] == \
            [{k: v for k, v in r.items() if k != "score"} for r in expected[rank]]
        np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in expected[rank]], rtol=1e-4)


@pytest.mark.parametrize("where", ["input", "output"])
def test_an_unreachable_bucket_is_one_line(where, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gcsfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    url = "gs://bucket/photos/" if where == "input" else "gs://bucket/emb.parquet"
    argv = ["embed", url, "--output", str(tmp_path / "e.parquet")] if where == "input" else \
        ["embed", str(tmp_path / "a.jpg"), "--output", url]
    start = time.monotonic()
    assert main([*argv, "--model", str(tmp_path / "never-loaded")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err and f"cannot reach {endpoint}" in err, err
    assert time.monotonic() - start < 15 and list(tmp_path.iterdir()) == []
