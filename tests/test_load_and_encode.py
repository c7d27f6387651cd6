"""bioclip_jax.load from every supported format, bioclip_jax.encode against open_clip, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_OPEN_CLIP_CFG
from PIL import Image
from safetensors.numpy import save_file

import bioclip_jax
from bioclip_jax.convert.state_dict import StateDictMismatch
from bioclip_jax.inference.model import bucket_sizes


def _open_clip_folder(path, state_dict, preprocess_cfg=None):
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG,
                                                             "preprocess_cfg": preprocess_cfg or {}}))
    save_file(state_dict, str(path / "open_clip_model.safetensors"))
    return path


def _text_features(model):
    return bioclip_jax.encode(model, texts=CAPTIONS)


def _reference_text(torch_model):
    with torch.no_grad():
        tokens = torch.from_numpy(bioclip_jax.tokenize(CAPTIONS).astype(np.int64))
        return torch_model.encode_text(tokens, normalize=True).numpy()


def test_load_every_format_gives_the_same_model(tmp_path, tiny_open_clip):
    torch_model, state_dict = tiny_open_clip
    reference = _reference_text(torch_model)
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "w.bin")
    # open_clip training checkpoint: {"epoch", "state_dict" with DDP's "module." prefix, ...}
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": torch.from_numpy(v)
                                                          for k, v in state_dict.items()}}, tmp_path / "epoch_3.pt")
    folder = _open_clip_folder(tmp_path / "hub", state_dict)
    sources = [(tmp_path / "w.safetensors", "tiny"), (tmp_path / "w.bin", "tiny"), (tmp_path / "epoch_3.pt", "tiny"),
               (folder, None)]
    for source, name in sources:
        model = bioclip_jax.load(source, model=name)
        assert model.config.quick_gelu
        assert np.abs(_text_features(model) - reference).max() < 1e-5, source
    # bioclip_jax's own folder, and back to open_clip: same tensors, bit for bit.
    kind, native = bioclip_jax.convert_checkpoint(folder, tmp_path / "native")
    assert kind == "bioclip_jax"
    kind, exported = bioclip_jax.convert_checkpoint(native, tmp_path / "exported")
    assert kind == "open_clip"
    back = bioclip_jax.load(exported)
    from safetensors.numpy import load_file

    written = load_file(str(exported / "open_clip_model.safetensors"))
    assert written.keys() == state_dict.keys()
    assert all(written[k].tobytes() == state_dict[k].tobytes() for k in state_dict)
    assert np.abs(_text_features(back) - reference).max() < 1e-5


def test_encode_images_matches_open_clip_preprocess_and_model(tmp_path, tiny_open_clip):
    import open_clip

    torch_model, state_dict = tiny_open_clip
    model = bioclip_jax.load(_open_clip_folder(tmp_path / "hub", state_dict))
    preprocess = open_clip.image_transform(64, is_train=False)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(80, 120), (64, 64), (300, 90)]]
    path = tmp_path / "a.png"
    Image.fromarray(arrays[0]).convert("RGBA").save(path)
    inputs = [str(path), Image.fromarray(arrays[1]).convert("L"), arrays[2]]
    pil_images = [Image.open(path), Image.fromarray(arrays[1]).convert("L"), Image.fromarray(arrays[2])]
    with torch.no_grad():
        reference = torch_model.encode_image(torch.stack([preprocess(im) for im in pil_images]), normalize=True)
    features = bioclip_jax.encode(model, images=inputs, batch_size=2)
    assert features.dtype == np.float32 and features.shape == (3, 64)
    assert np.abs(features - reference.numpy()).max() < 1e-5
    image_features, text_features = bioclip_jax.encode(model, images=inputs, texts=CAPTIONS)
    assert image_features.shape == (3, 64) and text_features.shape == (len(CAPTIONS), 64)
    raw = bioclip_jax.encode(model, images=inputs, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)


def test_odd_batch_sizes_reuse_a_few_compiled_shapes():
    model = bioclip_jax.create_model("tiny")
    for n in [1, 3, 5, 7, 8, 13, 16, 17]:
        out = bioclip_jax.encode(model, texts=["a photo of a bird."] * n, batch_size=16)
        assert out.shape == (n, 64)
    assert model._encode_text._cache_size() <= len(bucket_sizes(16))  # 1, 2, 4, 8, 16 at most
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32] and bucket_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_bare_weights_need_the_architecture(tmp_path, tiny_open_clip):
    _, state_dict = tiny_open_clip
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"no model config.*model='ViT-B-16-quickgelu'.*fit: tiny"):
        bioclip_jax.load(tmp_path / "w.safetensors")


def test_weights_that_do_not_fit_are_listed(tmp_path, tiny_open_clip):
    _, state_dict = tiny_open_clip
    broken = dict(state_dict)
    del broken["ln_final.weight"]
    broken["visual.extra"] = np.zeros(3, np.float32)
    broken["visual.proj"] = np.zeros((64, 32), np.float32)
    save_file(broken, str(tmp_path / "w.safetensors"))
    with pytest.raises(StateDictMismatch) as info:
        bioclip_jax.load(tmp_path / "w.safetensors", model="tiny")
    message = str(info.value)
    assert "missing keys" in message and "ln_final.weight (expected shape (64,))" in message
    assert "unexpected keys" in message and "visual.extra" in message
    assert "visual.proj: got (64, 32), expected (64, 64)" in message
    save_file(state_dict, str(tmp_path / "ok.safetensors"))
    with pytest.raises(StateDictMismatch, match="fit: tiny"):  # names the architecture that would fit
        bioclip_jax.load(tmp_path / "ok.safetensors", model="ViT-B-32")


def test_config_that_disagrees_with_model_name(tmp_path, tiny_open_clip):
    folder = _open_clip_folder(tmp_path / "hub", tiny_open_clip[1])
    with pytest.raises(ValueError, match="does not match model='ViT-B-16'"):
        bioclip_jax.load(folder, model="ViT-B-16")


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'ViT-B-61'.*Did you mean.*ViT-B-16"):
        bioclip_jax.get_model_config("ViT-B-61")


def test_unsupported_architecture_fields_are_refused():
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["vision_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(ValueError, match="ls_init_value=1e-05 is not supported"):
        bioclip_jax.models.CLIPConfig.from_open_clip(cfg)
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["text_cfg"]["heds"] = 4
    with pytest.raises(ValueError, match="unknown field 'heds'.*heads"):
        bioclip_jax.models.CLIPConfig.from_open_clip(cfg)


def test_registry_matches_open_clip_model_configs():
    import open_clip

    for name in bioclip_jax.list_models():
        if name in ("tiny", "demo", "bioclip", "bioclip-2"):
            continue
        ours = bioclip_jax.get_model_config(name)
        theirs = bioclip_jax.models.CLIPConfig.from_open_clip(open_clip.get_model_config(name), name)
        assert ours == theirs, name


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        bioclip_jax.load(tmp_path / "junk.safetensors", model="tiny")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="junk.pt: not a loadable weights-only torch checkpoint"):
        bioclip_jax.load(tmp_path / "junk.pt", model="tiny")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file"):
        bioclip_jax.load(tmp_path / "weights.npz", model="tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without open_clip_config.json"):
        bioclip_jax.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        bioclip_jax.load(tmp_path / "nowhere")


def test_pickled_code_is_never_executed(tmp_path):
    """A .pt whose pickle would run code is refused by weights_only loading, and the code does not run."""
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ValueError, match="evil.pt: not a loadable weights-only torch checkpoint"):
        bioclip_jax.load(tmp_path / "evil.pt", model="tiny")
    assert not marker.exists()


def test_undecodable_image_names_the_file(tmp_path):
    model = bioclip_jax.create_model("tiny")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode image"):
        bioclip_jax.encode(model, images=[str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.jpg: image file not found"):
        bioclip_jax.encode(model, images=[str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="uint8"):
        bioclip_jax.encode(model, images=[np.zeros((8, 8, 3), np.float32)])
