"""bioclip_jax equals open_clip: embeddings, logits, weights round trip, exported folders loaded by open_clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, open_clip_reference

import bioclip_jax
from bioclip_jax.convert import state_dict as sd
from bioclip_jax.convert.files import OPEN_CLIP_BIN, OPEN_CLIP_SAFETENSORS, Checkpoint
from bioclip_jax.inference.model import from_checkpoint
from bioclip_jax.models import CLIP

TOL = 1e-4  # max abs difference on normalised fp32 features


def _jax_model(name: str):
    _, state_dict = open_clip_reference(name)
    return from_checkpoint(Checkpoint(f"open_clip:{name}", state_dict=state_dict), model=name)


def _reference_features(torch_model, pixels_nhwc: np.ndarray, tokens: np.ndarray):
    with torch.no_grad():
        image = torch_model.encode_image(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()), normalize=True)
        text = torch_model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
        logits = torch_model.logit_scale.exp() * image @ text.T
    return image.numpy(), text.numpy(), logits.numpy()


def _scanned_features(name: str, pixels: np.ndarray, tokens: np.ndarray):
    """The same weights converted to the stacked layout and run by the scanned towers (nn.scan over layers)."""
    _, state_dict = open_clip_reference(name)
    config = bioclip_jax.get_model_config(name)
    params = sd.from_open_clip(state_dict, config, scan_layers=True)
    module = CLIP(config, scan_layers=True)
    image = module.apply({"params": params}, pixels, method="encode_image")
    text = module.apply({"params": params}, tokens, method="encode_text")
    return np.array(image), np.array(text)


def _check_parity(name: str, batch: int = 3, scan_layers: bool = False):
    torch_model, _ = open_clip_reference(name)
    model = _jax_model(name)
    size = model.config.vision.image_size
    pixels = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)
    tokens = bioclip_jax.tokenize(CAPTIONS)
    ref_image, ref_text, ref_logits = _reference_features(torch_model, pixels, tokens)
    if scan_layers:
        image, text = _scanned_features(name, pixels, tokens)
    else:
        image, text = model.encode_pixels(pixels), model.encode_tokens(tokens)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    logits = model.logit_scale * image @ text.T
    image_err, text_err = np.abs(image - ref_image).max(), np.abs(text - ref_text).max()
    mode = " (scan_layers)" if scan_layers else ""
    print(f"{name}{mode}: max |image diff| {image_err:.2e}, max |text diff| {text_err:.2e}, "
          f"max |logit diff| {np.abs(logits - ref_logits).max():.2e}")
    assert image_err <= TOL and text_err <= TOL
    np.testing.assert_allclose(logits, ref_logits, atol=100 * TOL)  # logit_scale ~ 14 multiplies the error
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()


@pytest.mark.integration  # full-size ViT-B/16 and ViT-L/14 against open_clip
@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("name", ["ViT-B-16-quickgelu", "ViT-B-16"])
def test_vit_b16_embeddings_match_open_clip(name, scan_layers):
    _check_parity(name, scan_layers=scan_layers)


@pytest.mark.integration  # full-size ViT-B/16 and ViT-L/14 against open_clip
@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
def test_vit_l14_embeddings_match_open_clip(scan_layers):
    _check_parity("ViT-L-14", batch=2, scan_layers=scan_layers)


def test_gelu_choice_matters():
    """QuickGELU and erf-GELU weights look alike: loading BioCLIP weights as plain ViT-B-16 changes the outputs."""
    _, state_dict = open_clip_reference("ViT-B-16-quickgelu")
    tokens = bioclip_jax.tokenize(CAPTIONS[:2])
    right = from_checkpoint(Checkpoint("x", state_dict=state_dict), model="ViT-B-16-quickgelu").encode_tokens(tokens)
    wrong = from_checkpoint(Checkpoint("x", state_dict=state_dict), model="ViT-B-16").encode_tokens(tokens)
    assert np.abs(right - wrong).max() > 1e-2


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("name", ["ViT-B-16-quickgelu", "ViT-B-32"])
def test_round_trip_is_bit_exact(name, scan_layers):
    _, state_dict = open_clip_reference(name)
    config = bioclip_jax.get_model_config(name)
    back = sd.to_open_clip(sd.from_open_clip(state_dict, config, scan_layers=scan_layers), config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_state_dict_layout_matches_open_clip():
    """302 tensors for ViT-B-16, every key and shape as open_clip's own state_dict."""
    _, state_dict = open_clip_reference("ViT-B-16")
    expected = sd.expected_state_dict_shapes(bioclip_jax.get_model_config("ViT-B-16"))
    assert len(expected) == 302
    assert expected == {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.integration  # full-size ViT-B/16 through open_clip
def test_exported_folder_loads_strictly_in_open_clip(tmp_path):
    """jax -> open_clip folder -> open_clip (local-dir:, and --model NAME --pretrained FILE for both files)."""
    import open_clip

    name = "ViT-B-16-quickgelu"
    _, state_dict = open_clip_reference(name)
    model = _jax_model(name)
    folder = bioclip_jax.export_open_clip(model, tmp_path / "export")
    tokens = torch.from_numpy(bioclip_jax.tokenize(CAPTIONS).astype(np.int64))
    loaded = [open_clip.create_model_and_transforms(f"local-dir:{folder}")[0],
              open_clip.create_model_and_transforms(name, pretrained=str(folder / OPEN_CLIP_SAFETENSORS))[0],
              open_clip.create_model_and_transforms(name, pretrained=str(folder / OPEN_CLIP_BIN))[0]]
    expected_text = model.encode_tokens(bioclip_jax.tokenize(CAPTIONS))
    for torch_model in loaded:
        assert torch_model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
        for key, value in torch_model.state_dict().items():
            assert np.array_equal(value.numpy(), state_dict[key]), key
        with torch.no_grad():
            text = torch_model.eval().encode_text(tokens).numpy()
        assert np.abs(text - expected_text).max() < 1e-4
