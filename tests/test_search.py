"""`bioclip-jax search` (inference/search.py, inference/ann.py): planted neighbours found exactly and through faiss,
queries by text, image and id on an index in embed's layouts, the saved faiss index reused, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bioclip_jax.cli import main
from bioclip_jax.errors import InputError
from bioclip_jax.inference import ann
from bioclip_jax.inference.search import Searcher, encode_queries, read_index, run_search, search

ROWS, DIM, CLUSTERS = 3000, 64, 30


def _write_parts(folder, emb: np.ndarray, ids, model=None, parts: int = 2, extra: dict | None = None, float16=False):
    """An index in embed's Parquet layout: uuid, emb, file_name, a carried column, and _manifest.json."""
    folder.mkdir(parents=True)
    value_type = pa.float16() if float16 else pa.float32()
    bounds = np.linspace(0, len(emb), parts + 1).astype(int)
    for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        flat = pa.array(emb[lo:hi].astype(np.float16 if float16 else np.float32).reshape(-1), value_type)
        columns = {"uuid": ids[lo:hi], "emb": pa.ListArray.from_arrays(pa.array(np.arange(hi - lo + 1) * emb.shape[1],
                                                                                pa.int32()), flat),
                   "file_name": [f"img/{i}.jpg" for i in ids[lo:hi]],
                   "species": [f"species {int(i) % 7}" if str(i).isdigit() else "x" for i in ids[lo:hi]]}
        columns.update({k: v[lo:hi] for k, v in (extra or {}).items()})
        pq.write_table(pa.table(columns), folder / f"part-{part:05d}.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"command": "embed", "model": model and {"source": model}}))
    return folder


def _planted(seed: int = 0):
    """Clustered vectors (like real embeddings, unlike uniform noise), and for 5 query rows 3 planted neighbours each
    at growing distances: rows 100 + 3q + j."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM))
    emb = centres[rng.integers(0, CLUSTERS, ROWS)] + 0.6 * rng.normal(size=(ROWS, DIM))
    for q in range(5):
        for j in range(3):
            emb[100 + 3 * q + j] = emb[q] + (0.03 + 0.03 * j) * rng.normal(size=DIM)
    return emb.astype(np.float32)


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
    emb = _planted()
    return _write_parts(tmp_path_factory.mktemp("search") / "emb.parquet", emb, [str(i) for i in range(ROWS)]), emb


def _numpy_top(emb, vectors, k):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit(vectors.astype(np.float64)) @ unit(emb.astype(np.float64)).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def test_exact_search_finds_planted_neighbours(planted_index):
    folder, emb = planted_index
    index = read_index(folder)
    assert len(index) == ROWS and index.dim == DIM and index.table.column_names == ["uuid", "file_name", "species"]
    queries = encode_queries(index, ids=[str(q) for q in range(5)])
    rows = search(index, queries, k=5)
    for q in range(5):
        hits = [r for r in rows if r["query"] == f"uuid:{q}"]
        assert [h["uuid"] for h in hits[:3]] == [str(100 + 3 * q + j) for j in range(3)]  # nearest first, self left out
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0]["file_name"] == f"img/{100 + 3 * q}.jpg" and hits[0]["species"] == f"species {(100 + 3 * q) % 7}"
    ref_scores, ref_rows = _numpy_top(emb, emb[:5], 6)
    np.testing.assert_allclose([r["score"] for r in rows], ref_scores[:, 1:].reshape(-1), rtol=0, atol=1e-6)
    assert [int(r["uuid"]) for r in rows] == ref_rows[:, 1:].reshape(-1).tolist()


def test_faiss_index_recall_saved_and_reused(planted_index, tmp_path):
    folder, emb = planted_index
    index = read_index(folder)
    searcher = Searcher(index, approximate=True, nprobe=1, progress=False)  # 1 list of 54: neighbours missed
    report = searcher.report
    nlist = ann.default_nlist(ROWS)
    assert report["factory"] == f"IVF{nlist},SQfp16" and report["built"] and report["recall_queries"] == 1000
    assert (folder / "_faiss" / f"ivf{nlist}_sqfp16.index").exists()
    # the recall printed is the recall measured: recompute it against numpy's exact neighbours
    picked = np.sort(np.random.default_rng(1).choice(ROWS, 1000, replace=False))
    approx = searcher.search(emb[picked], 11)[1]
    exact = _numpy_top(emb, emb[picked], 11)[1]
    drop_self = lambda rows: [[r for r in row if r != own][:10] for own, row in zip(picked, rows)]
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(drop_self(approx), drop_self(exact))])
    assert report["recall_at_10"] == pytest.approx(overlap, abs=0.002) and 0.5 < report["recall_at_10"] < 0.99
    rows = search(index, encode_queries(index, ids=["0", "1"]), 3, searcher)
    assert [r["uuid"] for r in rows] == ["100", "101", "102", "103", "104", "105"]
    # reused while the parts are unchanged; every list probed: the exact neighbours but for float16 storage's
    # rounding of a near-tie (1 of 10,000 here)
    again = Searcher(read_index(folder), approximate=True, nprobe=nlist, progress=False)
    assert not again.report["built"] and again.report["recall_at_10"] >= 0.999 > report["recall_at_10"]
    # a changed part (embed resumed, more rows) is a new index
    changed = _write_parts(tmp_path / "changed.parquet", emb[:2000], [str(i) for i in range(2000)])
    (changed / "_faiss").mkdir()
    for f in (folder / "_faiss").iterdir():
        (changed / "_faiss" / f.name).write_bytes(f.read_bytes())
    assert Searcher(read_index(changed), approximate=True, nlist=nlist, progress=False).report["built"]


@pytest.fixture(scope="module")
def model_index(tmp_path_factory):
    """A tiny random model saved to a folder, three PNGs listed with ids and a carried column, and what the real
    `embed` writes of them (float16 Parquet parts over two parts): search reads exactly embed's output."""
    from bioclip_jax.convert.checkpoint import save_model
    from bioclip_jax.inference.model import create_model, encode, load

    root = tmp_path_factory.mktemp("model_index")
    model_dir = str(save_model(create_model("tiny"), root / "model"))
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(str(root / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)).save(images[-1])
    (root / "images.csv").write_text("path,uuid,species\n" + "".join(
        f"{path},{name},x\n" for path, name in zip(images, "abc")))
    folder = root / "imgs.parquet"
    assert main(["embed", str(root / "images.csv"), "--model", model_dir, "--output", str(folder), "--float16",
                 "--part-size", "2", "--quiet"]) == 0
    index = read_index(folder)
    model = load(model_dir)
    assert index.model == model.source and index.preprocess["size"] == model.config.vision.image_size
    assert index.embeddings.dtype == np.float16 and index.table.column_names == ["uuid", "file_name", "species"]
    assert index.table.column("uuid").to_pylist() == ["a", "b", "c"]
    np.testing.assert_allclose(index.embeddings, encode(model, images=images, preprocess="pybioclip"), atol=2e-3)
    return folder, images, model, index.embeddings.astype(np.float32)


def test_text_and_image_queries_through_the_cli(model_index, tmp_path, capsys):
    from bioclip_jax.inference.model import encode

    folder, images, model, emb = model_index
    out = tmp_path / "hits.csv"
    assert main(["search", str(folder), "--image", images[1], "--text", "a photo of Pica hudsonia.", "-k", "2",
                 "--output", str(out)]) == 0
    assert "exact search over 3 rows" in capsys.readouterr().err
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["query", "rank", "score", "uuid", "file_name", "species"]
    text_rows = [r for r in rows if r["query"] == "a photo of Pica hudsonia."]
    image_rows = [r for r in rows if r["query"] == images[1]]
    assert image_rows[0]["uuid"] == "b" and float(image_rows[0]["score"]) == pytest.approx(1.0, abs=1e-5)
    text = encode(model, texts=["a photo of Pica hudsonia."])
    ref_scores, ref_rows = _numpy_top(emb, text, 2)
    assert [r["uuid"] for r in text_rows] == [["a", "b", "c"][i] for i in ref_rows[0]]
    np.testing.assert_allclose([float(r["score"]) for r in text_rows], ref_scores[0], atol=1e-5)
    assert main(["search", str(folder), "--id", "c", "-k", "1", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 1 and hits[0]["query"] == "uuid:c" and hits[0]["uuid"] != "c"


def test_npy_index_with_its_ids(planted_index, tmp_path):
    _, emb = planted_index
    np.save(tmp_path / "emb.npy", emb.astype(np.float16))
    (tmp_path / "emb.ids.csv").write_text("uuid,file_name\n" + "".join(f"{i:04d},f{i}.jpg\n" for i in range(ROWS)))
    rows, report = run_search(tmp_path / "emb.npy", ids=["0003"], k=3, progress=False)
    assert [r["uuid"] for r in rows] == ["0109", "0110", "0111"] and rows[0]["file_name"] == "f109.jpg"


def test_bad_input_is_one_line(planted_index, model_index, tmp_path, capsys):
    folder, emb = planted_index
    model_folder = model_index[0]
    # an index of 64-d vectors made by another model than the one given (tiny embeds to 64: use a 32-d index)
    small = _write_parts(tmp_path / "small.parquet", emb[:50, :32], [str(i) for i in range(50)],
                         model=str(model_folder.parent / "model"), parts=1)
    with pytest.raises(InputError, match=r"small.parquet holds 32-d embeddings; model .* embeds to 64-d"):
        run_search(small, texts=["a bird"])
    with pytest.raises(InputError, match="emb.parquet: records no model .* pass --model"):
        run_search(_write_parts(tmp_path / "emb.parquet", emb[:50], [str(i) for i in range(50)]), texts=["x"])
    with pytest.raises(InputError, match="no row has uuid 'nope'"):
        run_search(folder, ids=["nope"])
    with pytest.raises(InputError, match="duplicate uuid '7'"):
        read_index(_write_parts(tmp_path / "dup.parquet", emb[:20], [str(i) for i in range(19)] + ["7"]))
    np.save(tmp_path / "lone.npy", emb[:10])
    with pytest.raises(InputError, match=r"lone.npy: its ids file .*lone.ids.csv does not exist"):
        read_index(tmp_path / "lone.npy")
    with pytest.raises(InputError, match="search needs a query"):
        run_search(folder)
    searcher = Searcher(read_index(folder))
    with pytest.raises(InputError, match="holds 64-d embeddings; the queries are 32-d"):
        searcher.search(emb[:2, :32], 5)
    assert main(["search", str(folder), "--id", "1", "--output", str(tmp_path / "out.xlsx")]) == 2
    assert "the suffix chooses the format" in capsys.readouterr().err
