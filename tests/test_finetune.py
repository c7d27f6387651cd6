"""bioclip-jax finetune: a user's folder or CSV -> split, shards with real captions, the methods (trainable masks,
LoRA merged on export, a saved linear probe), defaults from the device, results, and the model folder open_clip,
pybioclip and bioclip_jax load."""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.data.pipeline import Captioner
from bioclip_jax.data.records import Record, find_shards, open_shards
from bioclip_jax.errors import InputError
from bioclip_jax.inference.probe import ProbeClassifier, fit_probe, load_probe
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.loss import clip_loss
from bioclip_jax.shards import make_shards
from bioclip_jax.shards.folder import LabelledSource, read_labelled_images, stratified_split
from bioclip_jax.train.finetune import Options, default_settings, finetune, wise_alpha, wise_ft
from bioclip_jax.train.lora import LORA_A, LORA_B, add_lora, merge_lora
from bioclip_jax.train.optimizer import make_optimizer, trainable_mask

COLOURS = {"Pica hudsonia": (200, 30, 30), "red fox": (30, 200, 30), "Ursus arctos": (30, 30, 200)}


def _photos(root, per_class=5, extra=True):
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    if extra:
        (root / "red fox" / "notes.txt").write_text("not an image")
        os.makedirs(root / "pica  hudsonia ")  # the same class, spelled another way
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "pica  hudsonia " / "x.png")
        os.makedirs(root / "Lonely one")
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "Lonely one" / "only.jpg")
    return root


def test_class_folders_split_and_bad_input_are_named(tmp_path):
    images = read_labelled_images(str(_photos(tmp_path / "photos")))
    assert images.classes == ["Lonely one", "Pica hudsonia", "Ursus arctos", "red fox"]
    assert any("notes.txt" in w for w in images.warnings)
    assert any("'pica hudsonia'" in w and "merged as 'Pica hudsonia'" in w for w in images.warnings)
    taxa = {r["class"]: r["taxon"] for r in images.rows}
    assert (taxa["Pica hudsonia"].genus, taxa["Pica hudsonia"].species) == ("Pica", "hudsonia")
    assert taxa["red fox"].common_name == "red fox" and not any(taxa["red fox"].ranks)

    train, held, notes = stratified_split(images.rows, 0.2, seed=0)
    counts = {c: sum(r["class"] == c for r in held) for c in images.classes}
    assert counts == {"Lonely one": 0, "Pica hudsonia": 1, "Ursus arctos": 1, "red fox": 1}  # 6 Pica: round(1.2)
    assert any("'Lonely one' has only 1 image" in n for n in notes)
    again = stratified_split(images.rows, 0.2, seed=0)
    assert [r["filepath"] for r in again[1]] == [r["filepath"] for r in held]
    assert [r["filepath"] for r in stratified_split(images.rows, 0.2, seed=1)[1]] != [r["filepath"] for r in held]


def test_csv_inputs(tmp_path):
    (tmp_path / "bad.csv").write_text("filepath,label\na.jpg,magpie\n")
    with pytest.raises(InputError, match=r"bad.csv: expected a filepath column and a class column.*found: "
                                         r"filepath, label"):
        read_labelled_images(str(tmp_path / "bad.csv"))
    (tmp_path / "ranks.csv").write_text(
        "filepath,genus,species,common_name,split\n"
        "a.jpg,Pica,hudsonia,magpie,\nb.jpg,Pica,hudsonia,magpie,\nc.jpg,Canis,lupus,,val\nd.txt,Canis,lupus,,\n")
    images = read_labelled_images(str(tmp_path / "ranks.csv"))
    assert images.classes == ["Canis lupus", "Pica hudsonia"] and images.has_ranks
    assert os.path.isabs(images.rows[0]["filepath"])
    assert any("d.txt" in w for w in images.warnings)
    _, held, notes = stratified_split(images.rows, 0.5, seed=0)
    assert [r["class"] for r in held] == ["Canis lupus", "Pica hudsonia"]
    assert notes == ["class 'Canis lupus' has images only in the held-out split: the fine-tune never trains on it "
                     "(evaluated only)"]


def test_shards_of_class_names_caption_every_record(tmp_path):
    """A folder with only class names trains on them: never "a photo of ."."""
    images = read_labelled_images(str(_photos(tmp_path / "photos", per_class=2, extra=False)))
    make_shards(LabelledSource({"train": images.rows}), str(tmp_path / "shards"), workers=1, progress=False)
    source = open_shards(find_shards(str(tmp_path / "shards" / "train")))
    records = [Record.from_bytes(source[i]) for i in range(len(source))]
    assert sorted({r.label for r in records}) == images.classes
    examples = [{"ranks": r.taxon.ranks, "common": r.taxon.common_name, "position": i, "skipped": None,
                 "image": np.zeros((2, 2, 3), np.uint8)} for i, r in enumerate(records)]
    tokens = Captioner("com", seed=0)(0, examples)["tokens"]
    expected = [f"a photo of {r.label}." for r in records]
    np.testing.assert_array_equal(tokens, bioclip_jax.tokenize(expected))


def test_images_that_cannot_be_read_are_a_named_warning(tmp_path):
    from bioclip_jax.inference.io import InputWarning
    from bioclip_jax.train.finetune import _unusable_images

    data = _photos(tmp_path / "photos", per_class=2, extra=False)
    (data / "red fox" / "broken.jpg").write_bytes(b"not a jpeg")
    images = read_labelled_images(str(data))
    summary = make_shards(LabelledSource({"train": images.rows}), str(tmp_path / "shards"), workers=1,
                          progress=False)
    with pytest.warns(InputWarning, match=r"skipped 1 image\(s\) that could not be used \(undecodable image: 1"):
        assert len(_unusable_images(summary, str(data))) == 1


def _tiny_params():
    rng = np.random.default_rng(0)
    block = {"mlp": {"c_fc": {"kernel": rng.normal(size=(4, 8)), "bias": np.zeros(8)}},
             "attn": {"in_proj": {"kernel": rng.normal(size=(4, 12)), "bias": np.zeros(12)}}}
    return jax.tree_util.tree_map(jnp.asarray, {
        "visual": {"transformer": {"resblocks_0": block}, "proj": rng.normal(size=(4, 3))},
        "text": {"transformer": {"resblocks": jax.tree_util.tree_map(lambda x: np.stack([x, x + 1]), block)}},
        "logit_scale": jnp.asarray(1.0)})


def test_lora_pairs_merge_exactly_in_both_layouts():
    params = _tiny_params()
    lora = add_lora(params, rank=2, seed=0)
    assert lora["text"]["transformer"]["resblocks"]["mlp"]["c_fc"][LORA_A].shape == (2, 4, 2)  # stacked layers
    assert not isinstance(lora["visual"]["proj"], dict)  # only attention and MLP kernels inside blocks
    assert jax.tree_util.tree_structure(merge_lora(lora)) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merge_lora(lora), params)  # B = 0: the same model
    fc = lora["text"]["transformer"]["resblocks"]["mlp"]["c_fc"]
    fc[LORA_B] = jnp.ones_like(fc[LORA_B])
    merged = merge_lora(lora)["text"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(merged, fc["kernel"] + fc[LORA_A] @ fc[LORA_B], rtol=1e-6)


@pytest.mark.parametrize("trainable, changed", [("vision", {"visual", "logit_scale"}), ("lora", {LORA_A, LORA_B})])
def test_only_the_trainable_params_move_and_hold_optimizer_state(trainable, changed):
    params = add_lora(_tiny_params(), rank=2) if trainable == "lora" else _tiny_params()
    mask = trainable_mask(params, trainable)
    tx, _ = make_optimizer(params, lr=0.1, warmup_steps=1, total_steps=10, trainable=mask)
    state = jax.jit(tx.init)(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(new)[0]:
        names = {getattr(k, "key", None) for k in path}
        moved = not np.array_equal(value, flat_old[path])
        assert moved == bool(names & changed), (path, moved)
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state) if getattr(x, "ndim", 0) >= 1)
    trained = sum(x.size for x, t in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if t)
    assert moments <= 2 * trained + 100  # Adam moments only for what trains


def test_defaults_come_from_the_data_and_the_device():
    b16, l14 = get_model_config("ViT-B-16-quickgelu"), get_model_config("ViT-L-14")
    cpu = default_settings(45, b16, "full", memory=None, devices=1)
    assert (cpu["train.global_batch_size"], cpu["train.steps"], cpu["train.warmup_steps"]) == (32, 43, 4)  # 30 epochs
    assert (cpu["dtype"], cpu["remat"]) == ("float32", "")
    assert default_settings(10, b16, "full", memory=None, devices=1)["train.global_batch_size"] == 10  # <= split
    t4 = default_settings(5000, l14, "full", memory=15 * 2 ** 30, devices=1)
    assert (t4["dtype"], t4["remat"]) == ("bfloat16", "dots")
    h200 = default_settings(5000, b16, "full", memory=140 * 2 ** 30, devices=8)
    assert (h200["remat"], h200["train.global_batch_size"], h200["train.accum_steps"]) == ("", 256, 1)
    assert h200["train.warmup_steps"] == round(0.1 * h200["train.steps"])
    lora = default_settings(5000, l14, "lora", memory=15 * 2 ** 30, devices=1)
    assert lora["train.global_batch_size"] * lora["train.accum_steps"] >= t4["train.global_batch_size"]
    # a few hundred photos: steps of 32 on any device, 300 of them (the bench's setting), never a handful of big ones
    small = default_settings(320, b16, "full", memory=80 * 2 ** 30, devices=1)
    assert (small["train.global_batch_size"], small["train.steps"]) == (32, 300)
    assert default_settings(1000, b16, "full", memory=None, devices=1)["train.steps"] == 313  # 10 epochs > 300 steps
    # replay rows ride along in the same memory: half the pairs per device, twice the accumulation
    v5e = {"memory": 16 * 2 ** 30, "devices": 8}
    plain, replay = (default_settings(5000, l14, "full", **v5e, replay=r) for r in (False, True))
    assert plain["train.global_batch_size"] == replay["train.global_batch_size"] == 256
    assert replay["train.accum_steps"] == 2 * plain["train.accum_steps"]


def test_probe_fits_saves_and_refuses_other_files(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8)
    labels = [f"c{i % 4}" for i in range(40)]
    features = centres[[i % 4 for i in range(40)]] + rng.normal(0, 0.1, (40, 8))
    probe = fit_probe(features, labels)
    assert [probe.classes[i] for i in probe.logits(features).argmax(1)] == labels
    probe.save(tmp_path)
    again = load_probe(tmp_path)
    np.testing.assert_array_equal(again.weight, probe.weight.astype(np.float32))
    (tmp_path / "other.json").write_text(json.dumps({"classes": ["a"], "weight": [[1.0]]}))
    with pytest.raises(InputError, match="other.json: not a linear probe file"):
        load_probe(tmp_path / "other.json")


def test_a_start_model_that_is_not_clip_is_one_line(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.layer.0.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "vit.safetensors"))
    data = _photos(tmp_path / "photos", per_class=2, extra=False)
    with pytest.raises(InputError, match="start model .*vit.safetensors.* is not a CLIP model"):
        finetune(data, tmp_path / "out", Options(start=str(tmp_path / "vit.safetensors"), arch="tiny"),
                 progress=False, workers=1)
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written


def test_distinct_captions_loss_matches_numpy():
    rng = np.random.default_rng(0)
    image, text = (rng.normal(size=(6, 4)) for _ in range(2))
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    labels = np.array([0, 1, 0, 2, 1, 0])
    tokens = np.stack([np.full(5, 7 + lab) for lab in labels]).astype(np.int32)
    logits = 10.0 * image @ text.T

    def cross_entropy(rows):  # each row against its own column and the columns of other labels
        terms = []
        for i in range(6):
            keep = (labels != labels[i]) | (np.arange(6) == i)
            terms.append(np.log(np.exp(rows[i, keep]).sum()) - rows[i, i])
        return np.mean(terms)
    expected = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
    got = clip_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(10.0), tokens=jnp.asarray(tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = clip_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(10.0))  # BioCLIP's loss: every row
    assert not np.isclose(got, plain)
    distinct = np.arange(6)[:, None] + np.zeros(5, np.int32)  # all captions differ: the two losses agree
    np.testing.assert_allclose(clip_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(10.0),
                                         tokens=jnp.asarray(distinct)), plain, rtol=1e-6)


def test_a_rerun_that_asks_for_the_same_model_resumes(tmp_path):
    from bioclip_jax.train.finetune import _claim

    _claim(str(tmp_path), "photos", Options(replay="shards"))
    _claim(str(tmp_path), "photos", Options(replay="shards", wise_alpha=1.0))  # the default, spelled out
    with pytest.raises(InputError, match=r"other settings \(wise_alpha\)"):
        _claim(str(tmp_path), "photos", Options(replay="shards", wise_alpha=0.5))


def test_wise_ft_interpolates_from_the_start_to_the_fine_tuned_weights():
    start = {"a": np.array([1.0, 2.0], np.float32), "b": {"c": np.array([[0.0]], np.float32)}}
    tuned = {"a": np.array([3.0, -2.0], np.float32), "b": {"c": np.array([[4.0]], np.float32)}}
    for alpha, expected in ((0.0, start), (1.0, tuned)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, wise_ft(start, tuned, alpha), expected)
    half = wise_ft(start, tuned, 0.5)
    np.testing.assert_array_equal(half["a"], [2.0, 0.0])
    assert half["b"]["c"].dtype == np.float32 and half["b"]["c"][0, 0] == 2.0
    with pytest.raises(ValueError, match="structure"):
        wise_ft(start, {"a": tuned["a"]}, 0.5)
    # the default alpha: the fine-tuned weights where replay keeps what the start knows, the half mix where nothing does
    assert (wise_alpha(Options(replay="shards")), wise_alpha(Options()), wise_alpha(Options(wise_alpha=0.3))) == (
        1.0, 0.5, 0.3)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    start = bioclip_jax.export_open_clip(bioclip_jax.create_model("tiny", seed=1), root / "start")
    data = _photos(root / "photos", per_class=5, extra=False)
    # Replay: shards of other classes, captioned by their names (records without a caption of their own)
    other = _photos(root / "other", per_class=2, extra=False)
    rows = read_labelled_images(str(other)).rows
    make_shards(LabelledSource({"train": rows}), root / "replay", resize=32, workers=1, progress=False)
    options = Options(start=str(start), method="lora", steps=3, lr=1e-2, templates="single",
                      replay=str(root / "replay" / "train"), replay_per_batch=4)
    return root, data, options, finetune(data, root / "out", options, progress=False, workers=1)


@pytest.mark.integration  # trains end to end
def test_lora_finetune_exports_plain_weights_that_open_clip_and_pybioclip_read(lora_run):
    import open_clip
    import torch
    from bioclip import predict as pybioclip

    root, data, options, result = lora_run
    with open(root / "out" / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    assert sorted({r["class"] for r in split if r["split"] == "val"}) == sorted(COLOURS)
    assert result.results["run"]["steps"] == 3 and "held-out top-1" in (root / "out" / "results.md").read_text()
    run = result.results["run"]
    assert run["replay_per_batch"] == 4 and run["distinct_captions"] and run["wise_alpha"] == 1.0  # replay
    metrics = [json.loads(line) for line in (root / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("continual_loss" in m for m in metrics)  # the replay rows trained, with their own loss
    ours = bioclip_jax.load(result.model_dir)
    start = bioclip_jax.load(options.start)
    assert jax.tree_util.tree_structure(ours.params) == jax.tree_util.tree_structure(start.params)  # merged
    kernel = ("visual", "transformer", "resblocks_0", "mlp", "c_fc", "kernel")
    get = lambda p: p[kernel[0]][kernel[1]][kernel[2]][kernel[3]][kernel[4]][kernel[5]]  # noqa: E731
    assert not np.allclose(get(ours.params), get(start.params))  # LoRA moved the merged weights
    np.testing.assert_array_equal(ours.params["text"]["token_embedding"]["embedding"],
                                  start.params["text"]["token_embedding"]["embedding"])  # frozen: bit for bit

    images = [r["filepath"] for r in split if r["split"] == "val"]
    torch_model = open_clip.create_model_and_transforms(f"local-dir:{result.model_dir}")[0].eval()
    pixels = np.stack([ours.preprocess(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        theirs = torch_model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours.encode_pixels(pixels), theirs, atol=2e-4)

    classes = json.loads((root / "out" / "model" / "classes.json").read_text())["classes"]
    reference = pybioclip.CustomLabelsClassifier(cls_ary=classes, model_str=f"local-dir:{result.model_dir}")
    mine = bioclip_jax.CustomLabelsClassifier(classes, model_str=result.model_dir, progress=False,
                                              preprocess="open_clip")
    top = lambda rows: {r["file_name"]: r["classification"] for r in rows if r["score"] == max(  # noqa: E731
        s["score"] for s in rows if s["file_name"] == r["file_name"])}
    assert top(reference.predict(images, k=1)) == top(mine.predict(images, k=1))

    with pytest.raises(InputError, match="already holds a finished fine-tune"):
        finetune(data, root / "out", options, progress=False, workers=1)


@pytest.mark.integration  # embeds and fits end to end
def test_probe_method_from_the_command_line_and_predict_probe(lora_run, tmp_path, capsys):
    from bioclip_jax.cli import main

    root, data, options, _ = lora_run
    assert main(["finetune", str(data), "--out", str(tmp_path / "probe"), "--start", options.start, "--method",
                 "probe", "--templates", "single", "--workers", "1"]) == 0
    assert "| held-out top-1 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert result["after"]["heldout"]["top1"] == 1.0  # three colours: linearly separable
    with open(tmp_path / "probe" / "split.csv", newline="") as f:
        held = [r for r in csv.DictReader(f) if r["split"] == "val"]
    model_dir = str(tmp_path / "probe" / "model")
    rows = ProbeClassifier(model_dir, model_str=model_dir, progress=False).predict([r["filepath"] for r in held], k=1)
    assert [r["classification"] for r in rows] == [r["class"] for r in held]
    assert main(["predict", *[r["filepath"] for r in held], "--probe", model_dir, "--k", "1", "--output",
                 str(tmp_path / "predictions.csv")]) == 0
    with open(tmp_path / "predictions.csv", newline="") as f:
        assert [r["classification"] for r in csv.DictReader(f)] == [r["class"] for r in held]
