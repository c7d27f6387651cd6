"""transformers interop: exported CLIPModel folders embed like open_clip on the original weights, and transformers CLIP
folders load as weights sources (round trips are bit-exact)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_OPEN_CLIP_CFG, open_clip_reference
from PIL import Image

import bioclip_jax
from bioclip_jax import cli
from bioclip_jax.convert import files
from bioclip_jax.convert.checkpoint import convert_checkpoint, export_transformers
from bioclip_jax.convert.files import Checkpoint
from bioclip_jax.inference.model import from_checkpoint

TOL = 1e-4  # max abs difference on normalised fp32 features


def _normalised(x) -> np.ndarray:
    x = getattr(x, "pooler_output", x)  # transformers >= 5 returns an output object, older versions the tensor
    x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_parity(torch_model, state_dict, folder, batch: int = 2, **model_kwargs) -> tuple[float, float]:
    """Max |diff| of normalised (image, text) embeddings: transformers on the export vs open_clip on the original."""
    from transformers import CLIPModel

    model = from_checkpoint(Checkpoint("open_clip", state_dict=state_dict, **model_kwargs.pop("ckpt", {})),
                            **model_kwargs)
    export_transformers(model, folder)
    hf_model = CLIPModel.from_pretrained(folder).eval()
    size = model.config.vision.image_size
    pixels = torch.from_numpy(np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(np.float32))
    tokens = torch.from_numpy(bioclip_jax.tokenize(CAPTIONS).astype(np.int64))
    with torch.no_grad():
        ref_image = _normalised(torch_model.encode_image(pixels))
        ref_text = _normalised(torch_model.encode_text(tokens))
        image = _normalised(hf_model.get_image_features(pixel_values=pixels))
        text = _normalised(hf_model.get_text_features(input_ids=tokens))
        assert np.isclose(float(hf_model.logit_scale), float(torch_model.logit_scale), rtol=0, atol=0)
    return float(np.abs(image - ref_image).max()), float(np.abs(text - ref_text).max())


def test_tiny_export_embeds_like_open_clip(tmp_path, tiny_open_clip):
    torch_model, state_dict = tiny_open_clip
    image_err, text_err = _hf_parity(torch_model, state_dict, tmp_path / "hf", ckpt={"model_cfg": TINY_OPEN_CLIP_CFG})
    print(f"tiny: max |image diff| {image_err:.2e}, max |text diff| {text_err:.2e}")
    assert image_err <= TOL and text_err <= TOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["projection_dim"] == 64
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "quick_gelu"
    assert config["text_config"]["layer_norm_eps"] == config["vision_config"]["layer_norm_eps"] == 1e-5


@pytest.mark.parametrize("name, act", [("ViT-B-16-quickgelu", "quick_gelu"),
                                       ("ViT-L-14", "gelu")])
@pytest.mark.integration  # full-size models through transformers
def test_export_embeds_like_open_clip(tmp_path, name, act):
    torch_model, state_dict = open_clip_reference(name)
    image_err, text_err = _hf_parity(torch_model, state_dict, tmp_path / "hf", model=name)
    print(f"{name}: max |image diff| {image_err:.2e}, max |text diff| {text_err:.2e}")
    assert image_err <= TOL and text_err <= TOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == act


def test_round_trip_through_transformers_is_exact(tmp_path, tiny_open_clip):
    """open_clip folder -> transformers folder (CLI --to) -> bioclip_jax equals loading the open_clip folder, and
    converting back gives the same open_clip tensors bit for bit."""
    _, state_dict = tiny_open_clip
    config = bioclip_jax.get_model_config("tiny")
    preprocess_cfg = {"size": 64, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    files.write_open_clip_folder(tmp_path / "oc", state_dict, config, preprocess_cfg, write_bin=False)
    assert cli.main(["convert", str(tmp_path / "oc"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    direct, via_hf = bioclip_jax.load(tmp_path / "oc"), bioclip_jax.load(tmp_path / "hf")
    assert via_hf.config.to_open_clip() == direct.config.to_open_clip()
    assert via_hf.preprocess == direct.preprocess
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(direct.params), jax.tree.leaves(via_hf.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    # A transformers folder as SRC: the default direction writes a bioclip_jax folder; --to open_clip goes back.
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "native")[0] == "bioclip_jax"
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "oc2", to="open_clip", write_bin=False)[0] == "open_clip"
    back = files.read_checkpoint(tmp_path / "oc2").state_dict
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert np.array_equal(back[key].reshape(value.shape), value), key


def test_bare_transformers_weights_load_with_an_architecture(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = bioclip_jax.create_model("tiny", seed=3)
    export_transformers(model, tmp_path / "hf")
    save_file(load_file(str(tmp_path / "hf" / "model.safetensors")), str(tmp_path / "weights.safetensors"))
    loaded = bioclip_jax.load(tmp_path / "weights.safetensors", model="tiny")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_processor_loads_and_agrees(tmp_path):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    model = bioclip_jax.create_model("tiny")
    export_transformers(model, tmp_path / "hf")
    processor = CLIPProcessor.from_pretrained(tmp_path / "hf")
    texts = [c for c in CAPTIONS if c]
    ours = bioclip_jax.tokenize(texts)
    slow = CLIPTokenizer(vocab=str(tmp_path / "hf" / "vocab.json"), merges=str(tmp_path / "hf" / "merges.txt"))
    for tokenizer in (processor.tokenizer, slow):
        ids = tokenizer(texts)["input_ids"]
        for row, expected in zip(ids, ours):  # same ids up to EOT; transformers pads with EOT, open_clip with 0
            assert row == [int(t) for t in expected[:len(row)]] and row[-1] == 49407
    # Padding with EOT instead of 0 changes nothing: the text is pooled at the first EOT, behind a causal mask.
    padded = processor.tokenizer(texts, padding="max_length", max_length=77, return_tensors="np")["input_ids"]
    hf_model = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_text = _normalised(hf_model.get_text_features(input_ids=torch.from_numpy(padded.astype(np.int64))))
    assert np.abs(hf_text - bioclip_jax.encode(model, texts=texts)).max() <= TOL
    assert np.abs(bioclip_jax.encode(model, texts=texts) - _normalised(model.encode_tokens(padded))).max() <= TOL
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    expected = model.preprocess(image)
    assert pixels.shape == expected.shape == (64, 64, 3)
    # Same transform (shortest side to 64 bicubic, center crop, OpenAI mean/std); resampling kernels differ slightly.
    assert np.abs(pixels - expected).mean() < 0.05


def test_not_clip_folders_are_rejected(tmp_path):
    model = bioclip_jax.create_model("tiny")
    export_transformers(model, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'siglip'; only transformers CLIP"):
        bioclip_jax.load(tmp_path / "hf")
    config["text_config"]["hidden_act"] = "gelu"  # vision stays quick_gelu
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act 'gelu' \\(text\\) / 'quick_gelu' \\(vision\\)"):
        bioclip_jax.load(tmp_path / "hf")
