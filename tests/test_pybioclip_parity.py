"""pybioclip itself is the oracle: its TreeOfLifeClassifier on a local species matrix and its custom-label classifiers,
on the same exported weights treated as a BioCLIP model (so pybioclip squashes images to 224 x 224), against our CLI
and Python classes on non-square images: same rows, scores within 1e-3.

pybioclip is pointed at local files without network: the exported architecture is registered with open_clip under a
name that is added to pybioclip's TOL_MODELS (what makes it squash and allows tree-of-life prediction), and its hub
download of txt_emb_species.npy/.json is replaced by the local folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import main
from bioclip_jax.inference.tree_of_life import EMBEDDINGS_FILE, NAMES_FILE
from bioclip_jax.models.config import get_model_config

ARCH = "tiny224"  # the tiny architecture at pybioclip's fixed 224 x 224 input
# Raw strings as a species JSON may hold them: lower-case and multi-word names are kept, never re-capitalised.
SPECIES = [
    (["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"], "black-billed magpie"),
    (["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax"], "common raven"),
    (["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "brachyrhynchos"], ""),
    (["Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Poecile", "atricapillus"], "chickadee"),
    (["Animalia", "Chordata", "Aves", "Accipitriformes", "Accipitridae", "Buteo", "jamaicensis"], "red-tailed hawk"),
    (["Animalia", "Chordata", "Mammalia", "Carnivora", "Canidae", "Canis", "lupus"], "gray wolf"),
    (["Animalia", "Chordata", "Mammalia", "Carnivora", "Ursidae", "Ursus", "arctos"], "brown bear"),
    (["Animalia", "Chordata", "Mammalia", "Rodentia", "Sciuridae", "Sciurus", "carolinensis"], "gray squirrel"),
    (["Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus"], "monarch"),
    (["Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria"], ""),
    (["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina"], "dog rose"),
    (["Bacteria", "incertae sedis", "unclassified Bacteria", "", "", "Candidatus Foo", "bar"], None),
]
LABELS = ["Pica hudsonia", "Corvus corax", "Canis lupus", "Ursus arctos", "Danaus plexippus", "Amanita muscaria"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(open_clip folder, safetensors file, species matrix folder, non-square image paths)."""
    import open_clip

    root = tmp_path_factory.mktemp("parity")
    tiny = get_model_config("tiny")
    config = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, image_size=224, patch_size=32))
    model = bioclip_jax.create_model(config, seed=3)
    model = dataclasses.replace(model, params={**model.params, "logit_scale": np.asarray(np.log(60.0), np.float32)})
    folder = bioclip_jax.export_open_clip(model, root / "export")
    (root / f"{ARCH}.json").write_text(json.dumps(config.to_open_clip()))
    open_clip.add_model_config(root / f"{ARCH}.json")

    # The species matrix, as pybioclip's files: text embeddings of each species' name, [D, N], and raw names.
    names = [[ranks, common] for ranks, common in SPECIES]
    texts = [f"a photo of {' '.join(r for r in ranks if r)}." for ranks, _ in SPECIES]
    matrix = bioclip_jax.encode(bioclip_jax.load(folder), texts=texts)
    emb = root / "txt_emb"
    emb.mkdir()
    np.save(emb / EMBEDDINGS_FILE, np.ascontiguousarray(matrix.T))
    (emb / NAMES_FILE).write_text(json.dumps(names), encoding="utf-8")

    rng = np.random.default_rng(7)
    images = []
    for i, (h, w) in enumerate([(120, 360), (300, 100), (97, 211), (224, 160), (400, 130)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx * yy) / (h * w)], axis=-1) * 255  # smooth structure, not only noise
        pixels = np.clip(base * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(str(root / f"img{i}.png"))
        Image.fromarray(pixels).save(images[-1])
    return folder, str(folder / "open_clip_model.safetensors"), emb, images


@pytest.fixture
def pybioclip(setup, monkeypatch):
    """pybioclip's predict module, offline, treating our exported architecture as one of its BioCLIP models."""
    import torch
    from bioclip import predict

    _, _, emb, _ = setup
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # same math, no compile time in tests
    monkeypatch.setitem(predict.TOL_MODELS, ARCH, "local/TreeOfLife")  # squash (preprocess_img), tree of life
    monkeypatch.setattr(predict.BaseClassifier, "get_cached_datafile",
                        lambda self, filename: str(emb / os.path.basename(filename)))
    return predict


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _compare(ours: list[dict], theirs: list[dict], what: str, report: dict) -> None:
    """Same rows (every column but the score, as strings) in the same order; scores within 1e-3."""
    def key(row):
        return [(c, "" if v is None else str(v)) for c, v in row.items() if c != "score"]

    assert [key(r) for r in ours] == [key(r) for r in theirs], what
    diff = np.abs(np.array([float(r["score"]) for r in ours]) - np.array([float(r["score"]) for r in theirs]))
    report[what] = (len(ours), float(diff.max()))
    assert diff.max() < 1e-3, what


def test_tree_of_life_matches_pybioclip(setup, pybioclip, tmp_path):
    folder, weights, emb, images = setup
    reference = pybioclip.TreeOfLifeClassifier(model_str=ARCH, pretrained_str=weights)
    report = {}
    for rank, args in [("species", []), ("family", ["--rank", "family"]), ("class", ["--rank", "class"])]:
        out = tmp_path / f"{rank}.csv"
        assert main(["predict", *images, "--model", str(folder), "--txt-emb", str(emb), *args,
                     "--output", str(out)]) == 0  # no mode: the tree of life at species rank, k=5
        expected = reference.predict(images, pybioclip.Rank[rank.upper()])
        _compare(_read_csv(out), expected, f"cli {rank}", report)

    # --subset alone: species rank among the subset; values at species rank are binomials.
    (tmp_path / "subset.csv").write_text("family\nCorvidae\nCanidae\nUrsidae\n")
    reference.apply_filter(reference.create_taxa_filter_from_csv(str(tmp_path / "subset.csv")))
    assert main(["predict", *images, "--model", str(folder), "--txt-emb", str(emb), "--subset",
                 str(tmp_path / "subset.csv"), "--output", str(tmp_path / "subset_out.csv")]) == 0
    _compare(_read_csv(tmp_path / "subset_out.csv"), reference.predict(images, pybioclip.Rank.SPECIES),
             "cli --subset family", report)
    (tmp_path / "species.csv").write_text("species\nPica hudsonia\nCorvus corax\nRosa canina\n")
    reference.apply_filter(reference.create_taxa_filter_from_csv(str(tmp_path / "species.csv")))
    assert main(["predict", *images, "--model", str(folder), "--txt-emb", str(emb), "--subset",
                 str(tmp_path / "species.csv"), "--output", str(tmp_path / "sp_out.csv")]) == 0
    _compare(_read_csv(tmp_path / "sp_out.csv"), reference.predict(images, pybioclip.Rank.SPECIES),
             "cli --subset species", report)

    # The Python class, with pybioclip's signature and Rank, returns pybioclip's rows.
    ours = bioclip_jax.TreeOfLifeClassifier(model_str=str(folder), txt_emb=emb, progress=False)
    reference.apply_filter([True] * len(SPECIES))
    for rank in (bioclip_jax.Rank.FAMILY, pybioclip.Rank.GENUS, "species"):
        expected = reference.predict(images, pybioclip.Rank[rank.upper()] if isinstance(rank, str) else
                                     pybioclip.Rank[rank.name], k=3)
        _compare(ours.predict(images, rank, k=3), expected, f"python {rank}", report)
    assert ours.failures == {}
    print("\npybioclip parity (rows, max |score difference|):", report)

    # Center-crop, what bioclip-jax did before, really differs on these images: the comparison above can fail.
    assert main(["predict", *images, "--model", str(folder), "--txt-emb", str(emb), "--preprocess", "open_clip",
                 "--output", str(tmp_path / "crop.csv")]) == 0
    reference.apply_filter([True] * len(SPECIES))
    cropped = _read_csv(tmp_path / "crop.csv")
    expected = reference.predict(images, pybioclip.Rank.SPECIES)
    assert max(abs(float(a["score"]) - b["score"]) for a, b in zip(cropped, expected)) > 1e-3


def test_unknown_subset_values_are_pybioclip_errors(setup, pybioclip, tmp_path, capsys):
    folder, weights, emb, images = setup
    (tmp_path / "subset.csv").write_text("species\nPica hudsonia\nPica hudsonai\n")
    reference = pybioclip.TreeOfLifeClassifier(model_str=ARCH, pretrained_str=weights)
    with pytest.raises(ValueError) as theirs:
        reference.create_taxa_filter_from_csv(str(tmp_path / "subset.csv"))
    assert main(["predict", images[0], "--model", str(folder), "--txt-emb", str(emb), "--subset",
                 str(tmp_path / "subset.csv")]) == 2
    err = capsys.readouterr().err
    assert str(theirs.value) in err and "subset.csv" in err  # "Unknown species received: Pica hudsonai. ..."
    ours = bioclip_jax.TreeOfLifeClassifier(model_str=str(folder), txt_emb=emb, progress=False)
    with pytest.raises(ValueError) as raised:
        ours.create_taxa_filter_from_csv(str(tmp_path / "subset.csv"))
    assert str(raised.value) == str(theirs.value)


def test_list_tol_taxa_prints_what_pybioclip_prints(setup, pybioclip, capsys):
    _, weights, emb, _ = setup
    expected = pybioclip.TreeOfLifeClassifier(model_str=ARCH, pretrained_str=weights).get_label_data().to_csv(
        index=False)
    capsys.readouterr()
    assert main(["list-tol-taxa", "--txt-emb", str(emb)]) == 0
    assert capsys.readouterr().out == expected


def test_custom_labels_and_bins_match_pybioclip(setup, pybioclip, tmp_path):
    folder, weights, _, images = setup
    report = {}
    reference = pybioclip.CustomLabelsClassifier(cls_ary=LABELS, model_str=ARCH, pretrained_str=weights)
    assert main(["predict", *images, "--model", str(folder), "--cls", ",".join(LABELS),
                 "--output", str(tmp_path / "cls.csv")]) == 0  # --k: all labels by default, as pybioclip
    _compare(_read_csv(tmp_path / "cls.csv"), reference.predict(images), "cli --cls", report)
    ours = bioclip_jax.CustomLabelsClassifier(LABELS, model_str=str(folder), progress=False)
    _compare(ours.predict(images, k=2), reference.predict(images, k=2), "python custom labels k=2", report)

    # A header that is not "label,bin" is still a header (pd.read_csv semantics), never a class.
    (tmp_path / "bins.csv").write_text("species,group\n" + "".join(
        f"{label},{'bird' if label.startswith(('Pica', 'Corvus')) else 'other ' + label.split()[0]}\n"
        for label in LABELS))
    from bioclip.commands import parse_bins_csv

    binned = pybioclip.CustomLabelsBinningClassifier(cls_to_bin=parse_bins_csv(str(tmp_path / "bins.csv")),
                                                     model_str=ARCH, pretrained_str=weights)
    assert main(["predict", *images, "--model", str(folder), "--bins", str(tmp_path / "bins.csv"),
                 "--output", str(tmp_path / "bins_out.csv")]) == 0
    _compare(_read_csv(tmp_path / "bins_out.csv"), binned.predict(images), "cli --bins", report)
    print("\npybioclip parity (rows, max |score difference|):", report)


def test_embed_matches_pybioclip(setup, pybioclip, tmp_path):
    folder, weights, _, images = setup
    classifier = pybioclip.BaseClassifier(model_str=ARCH, pretrained_str=weights)
    expected = classifier.create_image_features([classifier.ensure_rgb_image(p) for p in images],
                                                normalize=False).numpy()
    assert main(["embed", *images, "--model", str(folder), "--output", str(tmp_path / "e.json")]) == 0
    ours = json.loads((tmp_path / "e.json").read_text())["embeddings"]
    np.testing.assert_allclose([ours[p] for p in images], expected, atol=2e-4)


def test_label_data_is_pybioclip_dataframe_and_filters_alike(setup, pybioclip):
    import pandas as pd

    folder, weights, emb, images = setup
    reference = pybioclip.TreeOfLifeClassifier(model_str=ARCH, pretrained_str=weights)
    ours = bioclip_jax.TreeOfLifeClassifier(model_str=str(folder), txt_emb=emb, progress=False)
    df = ours.get_label_data()
    pd.testing.assert_frame_equal(df, reference.get_label_data())  # columns, dtypes, order, None common names
    # pybioclip's documented idiom: pick rows of the DataFrame, filter by their species, predict among them.
    bears = df[df.species == "Ursus arctos"]
    keep = ours.create_taxa_filter(bioclip_jax.Rank.SPECIES, bears.species)
    expected = reference.create_taxa_filter(pybioclip.Rank.SPECIES, bears.species)
    pd.testing.assert_series_equal(keep, expected)
    ours.apply_filter(keep)
    reference.apply_filter(expected)
    _compare(ours.predict(images[:2], bioclip_jax.Rank.SPECIES), reference.predict(images[:2], pybioclip.Rank.SPECIES),
             "filtered by DataFrame", {})
    for rank, values in [(pybioclip.Rank.FAMILY, ["Corvidae", "Canidae"]), (bioclip_jax.Rank.GENUS, ["Pica"])]:
        pd.testing.assert_series_equal(ours.create_taxa_filter(rank, values),
                                       reference.create_taxa_filter(pybioclip.Rank[rank.name], values))


def test_single_image_features_match_pybioclip(setup, pybioclip):
    folder, weights, _, images = setup
    reference = pybioclip.BaseClassifier(model_str=ARCH, pretrained_str=weights)
    ours = bioclip_jax.TreeOfLifeClassifier(model_str=str(folder), txt_emb=setup[2], progress=False)
    for normalize in (True, False):
        expected = reference.create_image_features_for_image(images[1], normalize).numpy()
        got = ours.create_image_features_for_image(Image.open(images[1]), normalize)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize("bad", ["", None, float("nan"), "pd.NA"])
def test_bad_bins_are_pybioclip_errors(setup, pybioclip, bad):
    import pandas as pd

    folder, weights, _, _ = setup
    bins = {"Pica hudsonia": "bird", "Canis lupus": pd.NA if bad == "pd.NA" else bad}
    with pytest.raises(ValueError) as theirs:
        pybioclip.CustomLabelsBinningClassifier(cls_to_bin=bins, model_str=ARCH, pretrained_str=weights)
    with pytest.raises(ValueError) as ours:
        bioclip_jax.CustomLabelsBinningClassifier(bins, model_str=str(folder))
    assert str(ours.value) == str(theirs.value) == "Empty, null, or nan are not allowed for bin values."


def test_public_names_and_signatures_are_pybioclips():
    """Every public function, class and method of pybioclip's predict.py and recorder.py exists here and takes
    pybioclip's arguments with pybioclip's defaults; the one different default is the device (JAX's default)."""
    import inspect

    from bioclip import _constants as bioclip_constants
    from bioclip import predict as their_predict
    from bioclip import recorder as their_recorder

    from bioclip_jax.inference import predict as our_predict
    from bioclip_jax.inference import recorder as our_recorder

    def same_arguments(theirs, ours, where):
        ours_params = inspect.signature(ours).parameters
        for p in inspect.signature(theirs).parameters.values():
            assert p.name in ours_params, where
            if p.default is not inspect.Parameter.empty and p.name != "device":
                assert ours_params[p.name].default == p.default, (where, p.name)

    for theirs_mod, ours_mod in [(their_predict, our_predict), (their_recorder, our_recorder)]:
        for name, value in vars(theirs_mod).items():
            if name.startswith("_") or getattr(value, "__module__", "").split(".")[0] != "bioclip":
                continue
            ours = getattr(ours_mod, name)
            if inspect.isclass(value):
                for method, fn in vars(value).items():
                    if callable(fn) and (not method.startswith("_") or method == "__init__"):
                        same_arguments(getattr(value, method), getattr(ours, method), f"{name}.{method}")
            elif callable(value):
                same_arguments(value, ours, name)
    for name in ["BIOCLIP_MODEL_STR", "BIOCLIP_V1_MODEL_STR", "BIOCLIP_V2_MODEL_STR", "TOL_MODELS",
                 "HF_DATAFILE_REPO_TYPE", "PRED_FILENAME_KEY", "PRED_CLASSICATION_KEY", "PRED_SCORE_KEY",
                 "SPECIES_LABEL", "SPECIES_EPITHET_LABEL", "COMMON_NAME_LABEL"]:
        assert getattr(our_predict, name) == getattr(their_predict, name, getattr(bioclip_constants, name, None)), name
    assert [t("x") for t in our_predict.OPENA_AI_IMAGENET_TEMPLATE] == \
        [t("x") for t in their_predict.OPENA_AI_IMAGENET_TEMPLATE]
    assert our_predict.get_rank_labels() == their_predict.get_rank_labels()
    import bioclip

    for name in ["Rank", "TreeOfLifeClassifier", "CustomLabelsClassifier", "CustomLabelsBinningClassifier",
                 "BIOCLIP_MODEL_STR", "BIOCLIP_V1_MODEL_STR", "BIOCLIP_V2_MODEL_STR"]:  # the package's own names
        assert name in bioclip_jax.__all__ and hasattr(bioclip_jax, name), name
        if name.startswith("BIOCLIP"):
            assert getattr(bioclip_jax, name) == getattr(bioclip, name)
    with pytest.raises(ValueError) as theirs:
        their_predict.get_tol_repo_id("ViT-B-16")
    with pytest.raises(ValueError) as ours:
        our_predict.get_tol_repo_id("ViT-B-16")
    assert str(ours.value) == str(theirs.value)


def _log_content(path) -> tuple[object, dict]:
    """(the log without what differs between two runs by design: times, the version line, model paths and the species
    matrix's source; those fields)."""
    text = path.read_text()
    if path.suffix == ".json":
        log = json.loads(text)
        fields = {k: log.pop(k, None) for k in ("pybioclip_version", "bioclip_jax_version", "start", "end", "model",
                                                 "pretrained")}
        fields["tree_of_life_version"] = log["top_level_settings"].pop("tree_of_life_version", None)
        return log, fields
    dropped = ("*", "Model: ", "Pretrained: ", "Tree Of Life Version: ")
    return [line for line in text.splitlines() if not line.startswith(dropped)], {}


@pytest.mark.integration  # runs pybioclip's torch models
def test_prediction_logs_match_pybioclip(setup, pybioclip, tmp_path):
    """pybioclip's `predict --log` (its commands.predict) against ours through the calls our CLI makes: the same
    JSON and text logs for --cls, --bins and the tree of life with --subset."""
    from bioclip.commands import predict as their_cli_predict

    from bioclip_jax.inference.recorder import attach_cli_recorder, save_recorded_predictions, verify_recorder_path

    folder, weights, emb, images = setup
    (tmp_path / "bins.csv").write_text("label,bin\nPica hudsonia,bird\nCorvus corax,bird\nCanis lupus,mammal\n")
    (tmp_path / "subset.csv").write_text("family\nCorvidae\nCanidae\n")
    modes = [  # (log name, pybioclip's arguments, our classifier, our predict arguments, our CLI's log arguments)
        ("cls.json", dict(cls_str=" Pica hudsonia,Canis lupus"), lambda: bioclip_jax.CustomLabelsClassifier(
            [" Pica hudsonia", "Canis lupus"], model_str=str(folder), progress=False), dict(k=None),
         dict(cls=" Pica hudsonia,Canis lupus")),
        ("bins.txt", dict(bins_path=str(tmp_path / "bins.csv"), k=1), lambda: bioclip_jax.CustomLabelsBinningClassifier(
            {"Pica hudsonia": "bird", "Corvus corax": "bird", "Canis lupus": "mammal"}, model_str=str(folder),
            progress=False), dict(k=1), dict(bins_path=str(tmp_path / "bins.csv"))),
        ("tol.json", dict(rank=pybioclip.Rank.FAMILY, k=3, subset=str(tmp_path / "subset.csv")),
         lambda: bioclip_jax.TreeOfLifeClassifier(model_str=str(folder), txt_emb=emb, progress=False),
         dict(rank="family", k=3), dict(subset=str(tmp_path / "subset.csv"))),
        ("tol.txt", dict(rank=pybioclip.Rank.SPECIES, k=5), lambda: bioclip_jax.TreeOfLifeClassifier(
            model_str=str(folder), txt_emb=emb, progress=False), dict(k=5), {}),
    ]
    for name, theirs_args, make_ours, predict_args, log_args in modes:
        theirs_log, ours_log = tmp_path / f"theirs_{name}", tmp_path / f"ours_{name}"
        arguments = {**dict(cls_str=None, rank=None, bins_path=None, k=None, subset=None), **theirs_args}
        for _ in range(1 if name.endswith(".json") else 2):  # text logs append
            their_cli_predict(images[:3], format="csv", output=str(tmp_path / "out.csv"), batch_size=10,
                              log=str(theirs_log), device="cpu", model_str=ARCH, pretrained_str=weights, **arguments)
            verify_recorder_path(str(ours_log))
            ours = make_ours()
            if log_args.get("subset"):
                ours.apply_filter(ours.create_taxa_filter_from_csv(log_args["subset"]))
            attach_cli_recorder(ours, **log_args)
            ours.predict(images[:3], batch_size=10, **predict_args)
            save_recorded_predictions(ours, str(ours_log))
        (expected, _), (got, ours_fields) = _log_content(theirs_log), _log_content(ours_log)
        assert got == expected, name
        if name.endswith(".json"):
            assert ours_fields["model"] == str(folder) and ours_fields["pretrained"] is None
            assert ours_fields["bioclip_jax_version"] == bioclip_jax.__version__
            assert ours_fields["tree_of_life_version"] == (str(emb) if name.startswith("tol") else None)
    with pytest.raises(ValueError, match="already exists") as raised:
        verify_recorder_path(str(tmp_path / "ours_cls.json"))
    assert "Please choose a different file name." in str(raised.value)


def _parse_error(main_fn, argv, capsys) -> tuple[int, str]:
    """(exit code, the message after "error: ") of a command line refused while parsing."""
    with pytest.raises(SystemExit) as raised:
        main_fn(argv)
    return raised.value.code, capsys.readouterr().err.strip().splitlines()[-1].split(" error: ", 1)[1]


@pytest.mark.parametrize("argv", [
    ["predict", "a.jpg", "--subset", "s.csv", "--cls", "x,y"], ["predict", "a.jpg", "--subset", "s.csv", "--bins", "b"],
    ["predict", "a.jpg", "--subset", "s.csv", "--rank", "class"], ["predict", "a.jpg", "--rank", "genus", "--cls", "x"],
    ["predict", "a.jpg", "--cls", "x", "--bins", "b.csv"], ["predict", "a.jpg", "--rank", "subspecies"],
    ["predict", "a.jpg", "--format", "json"], ["predict", "a.jpg", "--k", "five"], ["predict"], ["embed"],
    ["embed", "a.jpg", "--batch-size", "ten"], ["list-models", "--nope"], ["nope"]])
def test_bad_arguments_are_refused_as_pybioclip_refuses_them(argv, capsys):
    """pybioclip's own parser is the oracle: the same exit code and message for the same bad command line."""
    from bioclip.__main__ import create_parser

    theirs = _parse_error(create_parser().parse_args, argv, capsys)
    ours = _parse_error(main, argv, capsys)
    if argv == ["nope"]:  # the choices differ: we have more commands
        theirs, ours = (theirs[0], theirs[1].split(" (choose")[0]), (ours[0], ours[1].split(" (choose")[0])
    assert ours == theirs


@pytest.mark.parametrize("argv", [["predict", "a.jpg", "--pretrained", "w.safetensors"],
                                  ["predict", "a.jpg", "--model", "ViT-B-16", "--rank", "genus"],
                                  ["list-tol-taxa", "--model", "ViT-B-16"]])
def test_tree_of_life_model_errors_are_pybioclips(argv, capsys):
    """pybioclip refuses weights of its own and models without published species embeddings for the tree of life
    (a ValueError while parsing); ours is the same message as a one-line error, exit 2, before any model loads."""
    from bioclip.__main__ import parse_args

    with pytest.raises(ValueError) as theirs:
        parse_args(argv)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"bioclip-jax {argv[0]}: error: {theirs.value}\n"


@pytest.mark.integration  # runs pybioclip's torch models
def test_cli_prediction_logs_match_pybioclips_cli(setup, pybioclip, tmp_path, monkeypatch):
    """`predict --log` on both command lines (pybioclip's parser and commands.run against our main): the same JSON and
    text logs, but for times, versions, model paths and the species matrix's source; the command line is sys.argv."""
    from bioclip import commands
    from bioclip.__main__ import parse_args

    folder, weights, emb, images = setup
    (tmp_path / "bins.csv").write_text("label,bin\nPica hudsonia,bird\nCorvus corax,bird\nCanis lupus,mammal\n")
    (tmp_path / "subset.csv").write_text("family\nCorvidae\nCanidae\n")
    (tmp_path / "labels.txt").write_text("Pica hudsonia\n Canis lupus\n")

    def theirs(argv):  # pybioclip's parser refuses --pretrained for the tree of life: the weights are set after it
        args = parse_args(argv)
        args.pretrained = weights
        return commands.run(args)

    modes = [  # (log name, arguments of both, ours only)
        ("cls.json", ["--cls", str(tmp_path / "labels.txt")], []),
        ("bins.txt", ["--bins", str(tmp_path / "bins.csv"), "--k", "1"], []),
        ("tol.json", ["--subset", str(tmp_path / "subset.csv")], ["--txt-emb", str(emb)]),
        ("tol.txt", ["--rank", "family", "--k", "3", "--batch-size", "2"], ["--txt-emb", str(emb)]),
    ]
    for name, both, ours_only in modes:
        for _ in range(1 if name.endswith(".json") else 2):  # text logs append
            for program, model, extra, run in [("bioclip", ARCH, [], theirs),
                                               ("bioclip-jax", str(folder), ours_only, main)]:
                argv = ["predict", *images[:3], *both, "--model", model, *extra, "--device", "cpu",
                        "--output", str(tmp_path / "out.csv"), "--log", str(tmp_path / f"{program}_{name}")]
                monkeypatch.setattr("sys.argv", [program, *argv])
                assert run(argv) in (None, 0)
        (expected, _), (got, fields) = [_log_content(tmp_path / f"{p}_{name}") for p in ("bioclip", "bioclip-jax")]
        if name.endswith(".json"):
            assert got.pop("command_line").startswith("bioclip-jax predict ") and fields["model"] == str(folder)
            expected.pop("command_line")
        else:
            got, expected = [[line for line in lines if not line.startswith("Command Line: ")]
                             for lines in (got, expected)]
        assert got == expected, name
