"""pybioclip-style prediction: parity with pybioclip's CustomLabelsClassifier on the same exported weights and images,
label binning, per-file failures, and the embed command's JSON."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
from conftest import TINY_OPEN_CLIP_CFG
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import main
from bioclip_jax.convert.files import Checkpoint
from bioclip_jax.errors import InputError
from bioclip_jax.inference.classify import CustomLabelsBinningClassifier, CustomLabelsClassifier
from bioclip_jax.inference.model import from_checkpoint

LABELS = ["Pica hudsonia", "Corvus corax", "Danaus plexippus", "Amanita muscaria"]


@pytest.fixture(scope="module")
def exported(tiny_open_clip, tmp_path_factory):
    """(open_clip folder exported by bioclip_jax, image paths)."""
    folder = tmp_path_factory.mktemp("predict")
    model = from_checkpoint(Checkpoint("tiny", state_dict=tiny_open_clip[1]), model="tiny")
    export = bioclip_jax.export_open_clip(model, folder / "export")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(80, 120), (64, 64), (200, 90)]):
        images.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    return export, images


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_matches_pybioclip(exported, tmp_path, monkeypatch):
    import open_clip
    import torch
    from bioclip.predict import CustomLabelsClassifier as PyBioclipCustomLabels

    folder, images = exported
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(config)  # registers "tiny", so pybioclip can name it as model_str
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # same math, no compile time in tests
    reference = PyBioclipCustomLabels(cls_ary=LABELS, model_str="tiny",
                                      pretrained_str=str(folder / "open_clip_model.safetensors"))
    expected = reference.predict(images, k=3)

    assert main(["predict", *images, "--model", str(folder), "--cls", ",".join(LABELS), "--k", "3",
                 "--preprocess", "open_clip", "--output", str(tmp_path / "out.csv")]) == 0
    ours = _read_csv(tmp_path / "out.csv")
    assert [(r["file_name"], r["classification"]) for r in ours] == \
        [(r["file_name"], r["classification"]) for r in expected]
    np.testing.assert_allclose([float(r["score"]) for r in ours], [r["score"] for r in expected], atol=1e-3)


def test_binning_sums_label_probabilities(exported):
    folder, images = exported
    model = bioclip_jax.load(folder)
    plain = CustomLabelsClassifier(LABELS, model_str=model).predict(images[:1])
    bins = {"Pica hudsonia": "birds", "Corvus corax": "birds", "Danaus plexippus": "insects",
            "Amanita muscaria": "fungi"}
    binned = {r["classification"]: r["score"] for r in CustomLabelsBinningClassifier(bins, model_str=model).predict(
        images[:1])}
    by_label = {r["classification"]: r["score"] for r in plain}
    assert binned["birds"] == pytest.approx(by_label["Pica hudsonia"] + by_label["Corvus corax"], abs=1e-6)
    assert sum(binned.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="Empty, null, or nan are not allowed for bin values."):
        CustomLabelsBinningClassifier({"a": ""}, model_str=model)


def test_bad_files_are_reported_and_the_rest_classified(exported, tmp_path, capsys):
    folder, images = exported
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code = main(["predict", images[0], str(broken), str(tmp_path / "missing.jpg"), "--model", str(folder),
                 "--cls", "a bird,a fungus", "--format", "table"])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err and "missing.jpg" in captured.err
    assert images[0] in captured.out and "classification" in captured.out
    assert main(["predict", images[0], "--model", str(folder), "--cls", " , "]) == 2
    assert "labels must be non-empty" in capsys.readouterr().err


def test_embed_json(exported, tmp_path):
    folder, images = exported
    assert main(["embed", *images, "--model", str(folder), "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["embeddings"]) == set(images)
    model = bioclip_jax.load(folder)
    expected = bioclip_jax.encode(model, images=[Image.open(p).convert("RGB") for p in images], normalize=False,
                                  preprocess="pybioclip")  # pybioclip squashes for BioCLIP models: so do we
    np.testing.assert_allclose([result["embeddings"][p] for p in images], expected, atol=1e-6)
    assert main(["embed", *images, "--model", str(folder), "--preprocess", "open_clip", "--output",
                 str(tmp_path / "crop.json")]) == 0
    cropped = json.loads((tmp_path / "crop.json").read_text())["embeddings"]
    np.testing.assert_allclose([cropped[p] for p in images], bioclip_jax.encode(model, images=images,
                                                                                normalize=False), atol=1e-6)


def _taxa_csv(path):
    rows = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "black-billed magpie"),
            ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "common raven"),
            ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "brachyrhynchos", ""),
            ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "monarch"),
            ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria", "")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name"])
        writer.writerows(rows)
    return path


def test_tree_of_life_prediction_sums_species_by_rank(exported, tmp_path):
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier, load_txt_emb

    folder, images = exported
    assert main(["make-txt-emb", str(_taxa_csv(tmp_path / "taxa.csv")), "--model", str(folder),
                 "--out", str(tmp_path / "emb")]) == 0
    matrix, taxa = load_txt_emb(tmp_path / "emb")
    assert matrix.shape == (64, 5) and np.allclose(np.linalg.norm(matrix, axis=0), 1, atol=1e-5)
    assert taxa[1].common_name == "common raven" and taxa[0].ranks[6] == "hudsonia"

    classifier = TreeOfLifeClassifier(bioclip_jax.load(folder), txt_emb=tmp_path / "emb")
    species = classifier.predict(images[:1], rank="species", k=5)
    assert list(species[0]) == ["file_name", "kingdom", "phylum", "class", "order", "family", "genus",
                                "species_epithet", "species", "common_name", "score"]
    assert sum(r["score"] for r in species) == pytest.approx(1.0, abs=1e-5)
    by_species = {r["species"]: r["score"] for r in species}
    genus = {r["genus"]: r["score"] for r in classifier.predict(images[:1], rank="genus", k=5)}
    assert genus["Corvus"] == pytest.approx(by_species["Corvus corax"] + by_species["Corvus brachyrhynchos"], abs=1e-6)
    kingdoms = classifier.predict(images[:1], rank=bioclip_jax.Rank.KINGDOM, k=1)
    assert len(kingdoms) == 1 and list(kingdoms[0]) == ["file_name", "kingdom", "score"]

    (tmp_path / "subset.csv").write_text("family\nCorvidae\n")
    assert main(["predict", images[0], "--model", str(folder), "--txt-emb",  # --subset: species rank
                 str(tmp_path / "emb"), "--subset", str(tmp_path / "subset.csv"), "--output",
                 str(tmp_path / "sub.csv")]) == 0
    subset_rows = _read_csv(tmp_path / "sub.csv")
    assert {r["family"] for r in subset_rows} == {"Corvidae"} and len(subset_rows) == 3


def test_text_embeddings_of_another_model_are_refused(exported, tmp_path):
    from bioclip_jax.data.taxonomy import Taxon
    from bioclip_jax.inference.tree_of_life import TreeOfLifeClassifier, save_txt_emb

    folder, _ = exported
    save_txt_emb(tmp_path / "emb", np.ones((1, 512), np.float32), [Taxon.from_ranks(["A", "", "", "", "", "B", "c"])])
    with pytest.raises(ValueError, match="dimension 512, but the model embeds to 64"):
        TreeOfLifeClassifier(bioclip_jax.load(folder), txt_emb=tmp_path / "emb")
    assert main(["predict", "x.jpg", "--model", str(folder), "--rank", "genus"]) == 2  # needs --txt-emb


def test_tree_of_life_is_the_default_mode_and_needs_embeddings_for_local_models(exported, tmp_path, capsys):
    folder, images = exported
    assert main(["predict", images[0], "--model", str(folder)]) == 2  # pybioclip's message
    assert "TreeOfLife predictions are only supported for the following models" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused while parsing, as pybioclip does
        main(["predict", images[0], "--model", str(folder), "--cls", "a,b", "--subset", "s.csv"])
    assert "argument --subset: not allowed with argument --cls" in capsys.readouterr().err


def test_output_is_checked_before_any_work(tmp_path, capsys):
    missing_model = str(tmp_path / "no_such_model")  # would fail later, when loading: the output check comes first
    for command in (["predict", "x.jpg", "--cls", "a,b"], ["embed", "x.jpg"]):
        assert main([*command, "--model", missing_model, "--output", str(tmp_path)]) == 2
        assert "is a directory; expected a file name" in capsys.readouterr().err
        assert main([*command, "--model", missing_model, "--output", str(tmp_path / "nope" / "out")]) == 2
        assert "nope does not exist" in capsys.readouterr().err


def test_label_warnings_on_the_command_line(exported, tmp_path, capsys):
    folder, images = exported
    assert main(["predict", images[0], "--model", str(folder), "--cls", str(tmp_path / "labesl.txt")]) == 0
    captured = capsys.readouterr()
    assert "warning: --cls" in captured.err and "looks like a file name but there is no such file" in captured.err
    assert "warning: only one label" in captured.err
    assert _rows(captured.out)[0]["score"] == "1.0"


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_non_finite_scores_are_an_error_naming_the_model(exported, tmp_path, capsys):
    folder, images = exported
    model = bioclip_jax.load(folder)
    broken = dataclasses.replace(model, params={**model.params, "logit_scale": np.float32(np.nan)})
    with pytest.raises(InputError, match="non-finite scores"):
        CustomLabelsClassifier(LABELS, model_str=broken, progress=False).predict(images[:1])
    bioclip_jax.export_open_clip(broken, tmp_path / "broken")
    assert main(["predict", images[0], "--model", str(tmp_path / "broken"), "--cls", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "non-finite scores" in err and "broken" in err and "logit_scale nan" in err


def test_images_stream_one_batch_ahead_with_a_progress_bar(exported, tmp_path, monkeypatch, capsys):
    """Memory flat in the number of images: when the first batch is embedded, at most two batches were decoded."""
    from bioclip_jax.inference import model as model_module

    folder, images = exported
    loaded, decoded_at_encode = [], []
    real_load = model_module.load_image
    monkeypatch.setattr(model_module, "load_image", lambda src: loaded.append(src) or real_load(src))
    classifier = CustomLabelsClassifier(LABELS, model_str=bioclip_jax.load(folder))
    real_encode = classifier.model.encode_pixels
    monkeypatch.setattr(classifier.model, "encode_pixels",
                        lambda pixels: decoded_at_encode.append(len(loaded)) or real_encode(pixels))
    many = [images[i % len(images)] for i in range(20)] + [str(tmp_path / "missing.png")]
    rows = classifier.predict(many, k=1, batch_size=4)
    assert len(rows) == 20 and list(classifier.failures) == [str(tmp_path / "missing.png")]
    assert decoded_at_encode[0] <= 8 and len(decoded_at_encode) == 5  # the last batch holds only the missing file
    assert re.search(r"21/21 \[.*images/s\]", capsys.readouterr().err)
    calls = []
    classifier.predict(many[:5], batch_size=2, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_version_device_and_pybioclip_spelling(exported, tmp_path, capsys):
    import jax

    folder, images = exported
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"bioclip-jax {bioclip_jax.__version__}"
    # pybioclip's --model ARCH --pretrained FILE, and --device.
    assert main(["embed", images[0], "--model", "tiny", "--pretrained", str(folder / "open_clip_model.safetensors"),
                 "--device", "cpu", "--output", str(tmp_path / "e.json")]) == 0
    assert main(["embed", images[0], "--model", str(folder), "--output", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["embeddings"] == \
        json.loads((tmp_path / "f.json").read_text())["embeddings"]
    if not any(d.platform == "tpu" for d in jax.devices()):
        assert main(["embed", images[0], "--model", str(folder), "--device", "tpu"]) == 2
        assert "JAX has no tpu backend here" in capsys.readouterr().err
    assert main(["embed", images[0], "--model", str(folder), "--device", "abacus"]) == 2
    assert "expected one of cpu, cuda, gpu, tpu" in capsys.readouterr().err


def test_eval_embedding_bar_has_a_total(exported, monkeypatch):
    from bioclip_jax.evaluate import zero_shot

    folder, images = exported
    totals = []
    real_tqdm = zero_shot.tqdm
    monkeypatch.setattr(zero_shot, "tqdm", lambda *a, **kw: totals.append(kw.get("total")) or real_tqdm(*a, **kw))
    with open(images[0], "rb") as f:
        data = f.read()
    records = [{"image": data, "id": str(i), "label": "x", "ranks": ["A", "B", "C", "D", "E", "F", "g"],
                "common": ""} for i in range(5)]
    features, *_ = zero_shot.embed_eval_set(bioclip_jax.load(folder), records, batch_size=2)
    assert len(features) == 5 and totals == [3]
