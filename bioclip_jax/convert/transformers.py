"""transformers `CLIPModel` folders <-> open_clip state dicts: the same tensors under other names.

    config.json                 CLIPConfig (text_config, vision_config, projection_dim; hidden_act quick_gelu/gelu)
    model.safetensors           CLIPModel weights (pytorch_model.bin is read too)
    preprocessor_config.json    CLIPImageProcessor (mean, std, size, crop)
    tokenizer files             CLIPTokenizer built from the CLIP BPE vocabulary shipped in bioclip_jax/assets

Naming (open_clip -> transformers), per tower (`visual.` -> `vision_model.`, top level -> `text_model.`):
  transformer.resblocks.{i}.attn.in_proj_weight  -> encoder.layers.{i}.self_attn.{q,k,v}_proj.weight (split on dim 0)
  ...ln_1 / ln_2 / mlp.c_fc / mlp.c_proj / attn.out_proj
                                                 -> layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2 / self_attn.out_proj
  visual.conv1, class_embedding, positional_embedding, ln_pre, ln_post -> embeddings.patch_embedding, .class_embedding,
  .position_embedding, pre_layrnorm (sic), post_layernorm; token_embedding, positional_embedding, ln_final ->
  embeddings.token_embedding, .position_embedding, final_layer_norm. `visual.proj` and `text_projection` are applied as
  `x @ P`; transformers' visual_projection / text_projection are Linear layers, so their weights are P transposed.
The mapping needs no config: splitting and stacking q, k, v and transposing are exact, so a round trip is bit-exact.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from etils import epath
from safetensors.numpy import save as save_safetensors

from bioclip_jax import paths
from bioclip_jax.errors import InputError
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.tokenizer import NUM_MERGES, VOCAB_FILE, bytes_to_unicode

CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5: {"image_processor": {...}, ...}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
LAYER_NORM_EPS = 1e-5  # open_clip's (PyTorch's) LayerNorm eps; the JAX model uses it everywhere
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names for open_clip's ids 49406 and 49407

_TOP = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_PROJECTIONS_BACK = {v: k for k, v in _PROJECTIONS.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_OPEN_CLIP_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("q_proj", "k_proj", "v_proj")
# PIL resample codes, as transformers stores them.
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_RESAMPLE_BACK = {v: k for k, v in _RESAMPLE.items()}


def is_transformers_state_dict(tensors: Mapping[str, Any]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in tensors)


def to_transformers_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """open_clip state_dict (plain or CustomTextCLIP keys) -> transformers CLIPModel state_dict."""
    out = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        key = key[len("text."):] if key.startswith("text.") else key  # CustomTextCLIP: same tensors
        if key in _TOP:
            out[_TOP[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = np.ascontiguousarray(value.T)
        elif (m := _OPEN_CLIP_BLOCK.fullmatch(key)) is not None:
            prefix = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}."
            module, leaf = (m[3].rsplit("_", 1) if m[3].startswith("attn.in_proj_") else m[3].rsplit(".", 1))
            if module == "attn.in_proj":  # torch MultiheadAttention's fused q, k, v
                for name, part in zip(_QKV, np.split(value, 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{leaf}"] = np.ascontiguousarray(part)
            elif module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{leaf}"] = value
            else:
                raise InputError(f"open_clip key {key!r} has no transformers CLIP counterpart")
        else:
            raise InputError(f"open_clip key {key!r} has no transformers CLIP counterpart")
    return out


def to_open_clip_state_dict(tensors: Mapping[str, np.ndarray], where: str = "") -> dict[str, np.ndarray]:
    """transformers CLIPModel state_dict -> open_clip state_dict (plain CLIP keys)."""
    out, qkv, unknown = {}, {}, []
    for key, value in tensors.items():
        if key.endswith(".position_ids"):  # a buffer older transformers versions saved; not a weight
            continue
        if key in _TOP_BACK:
            out[_TOP_BACK[key]] = value
        elif key in _PROJECTIONS_BACK:
            out[_PROJECTIONS_BACK[key]] = np.ascontiguousarray(np.asarray(value).T)
        elif (m := _HF_BLOCK.fullmatch(key)) is not None:
            prefix = f"{'visual.' if m[1] == 'vision_model' else ''}transformer.resblocks.{m[2]}."
            module = m[3]
            if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
                qkv.setdefault(f"{prefix}attn.in_proj_{m[4]}", {})[module[len("self_attn."):]] = value
            elif module in _BLOCK_BACK:
                out[f"{prefix}{_BLOCK_BACK[module]}.{m[4]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise InputError(f"{where or 'weights'}: {len(unknown)} key(s) that are not transformers CLIPModel weights: "
                         f"{shown}")
    for key, parts in qkv.items():
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise InputError(f"{where or 'weights'}: {key} needs q_proj, k_proj and v_proj; missing {missing}")
        out[key] = np.concatenate([np.asarray(parts[name]) for name in _QKV], axis=0)
    return out


def model_cfg_from_config(config: dict[str, Any], where: str = CONFIG) -> dict[str, Any]:
    """transformers config.json of a CLIPModel -> open_clip model_cfg. Missing fields take transformers' defaults."""
    if config.get("model_type") != "clip":
        raise InputError(f"{where}: model_type {config.get('model_type')!r}; only transformers CLIP models "
                         "(model_type 'clip') are supported")
    from transformers import CLIPConfig as HFConfig

    hf = HFConfig.from_dict(config)
    text, vision = hf.text_config, hf.vision_config
    acts = {text.hidden_act, vision.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise InputError(f"{where}: hidden_act {text.hidden_act!r} (text) / {vision.hidden_act!r} (vision); "
                         "supported: 'quick_gelu' or 'gelu' (exact) in both towers")
    for tower, cfg in (("text", text), ("vision", vision)):
        if not math.isclose(cfg.layer_norm_eps, LAYER_NORM_EPS, rel_tol=1e-6):
            raise InputError(f"{where}: {tower}_config.layer_norm_eps={cfg.layer_norm_eps}; only {LAYER_NORM_EPS} "
                             "(open_clip's) is supported")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise InputError(f"{where}: {tower}_config.hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
    if vision.num_channels != 3:
        raise InputError(f"{where}: vision_config.num_channels={vision.num_channels}; only RGB (3) is supported")
    if text.eos_token_id not in (2, text.vocab_size - 1):
        # transformers pools at the first eos_token_id (2 means the legacy argmax); open_clip at argmax(ids), which
        # is the same token only when EOT is the largest id.
        raise InputError(f"{where}: text_config.eos_token_id={text.eos_token_id}; expected the largest token id "
                         f"({text.vocab_size - 1}) as in CLIP's vocabulary")
    model_cfg = {
        "embed_dim": hf.projection_dim,
        "vision_cfg": {"image_size": vision.image_size, "layers": vision.num_hidden_layers,
                       "width": vision.hidden_size, "patch_size": vision.patch_size,
                       "head_width": vision.hidden_size // vision.num_attention_heads,
                       "mlp_ratio": _mlp_ratio(vision, f"{where} vision_config")},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                     "mlp_ratio": _mlp_ratio(text, f"{where} text_config")},
    }
    if acts == {"quick_gelu"}:
        model_cfg["quick_gelu"] = True
    return model_cfg


def _mlp_ratio(cfg, where: str) -> float:
    ratio = cfg.intermediate_size / cfg.hidden_size
    if int(cfg.hidden_size * ratio) != cfg.intermediate_size:  # open_clip computes int(width * mlp_ratio)
        raise InputError(f"{where}: intermediate_size {cfg.intermediate_size} is not expressible as "
                         f"int(hidden_size * mlp_ratio) for hidden_size {cfg.hidden_size}")
    return ratio


def transformers_config(config: CLIPConfig):
    """The transformers.CLIPConfig of a model config."""
    from transformers import CLIPConfig as HFConfig

    act = "quick_gelu" if config.quick_gelu else "gelu"  # transformers' "gelu" is the exact (erf) GELU, as open_clip
    text, vision = config.text, config.vision
    hf = HFConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width,
                         intermediate_size=int(text.width * text.mlp_ratio), num_hidden_layers=text.layers,
                         num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                         hidden_act=act, layer_norm_eps=LAYER_NORM_EPS, projection_dim=config.embed_dim,
                         bos_token_id=text.vocab_size - 2, eos_token_id=text.vocab_size - 1,
                         pad_token_id=text.vocab_size - 1),
        vision_config=dict(hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
                           num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                           image_size=vision.image_size, patch_size=vision.patch_size, num_channels=3,
                           hidden_act=act, layer_norm_eps=LAYER_NORM_EPS, projection_dim=config.embed_dim),
        projection_dim=config.embed_dim,
    )
    hf.architectures = ["CLIPModel"]
    return hf


def preprocess_cfg_from_config(config: dict[str, Any], where: str = PREPROCESSOR_CONFIG) -> dict[str, Any]:
    """preprocessor_config.json (CLIPImageProcessor) -> open_clip preprocess_cfg."""
    size, crop = config.get("size", {"shortest_edge": 224}), config.get("crop_size", {"height": 224, "width": 224})
    side = lambda s: s if isinstance(s, int) else s.get("shortest_edge", s.get("height"))  # noqa: E731
    square = lambda s: isinstance(s, int) or s.get("height") == s.get("width")  # noqa: E731
    if config.get("do_center_crop", True):
        if not square(crop) or side(size) != side(crop):
            raise InputError(f"{where}: resize to {size} then crop to {crop}; only a square crop of the resized "
                             "shortest side (open_clip's eval transform) is supported")
        out = {"size": side(crop), "resize_mode": "shortest"}
    else:
        if not square(size):
            raise InputError(f"{where}: size {size}; only square images are supported")
        out = {"size": side(size), "resize_mode": "squash"}
    resample = config.get("resample", 3)
    if resample not in _RESAMPLE_BACK:
        raise InputError(f"{where}: resample={resample}; supported: {_RESAMPLE} (PIL codes)")
    out["interpolation"] = _RESAMPLE_BACK[resample]
    for key, name in (("mean", "image_mean"), ("std", "image_std")):
        if name in config:
            out[key] = [float(x) for x in config[name]]
    return out


def image_processor(preprocess_cfg: dict[str, Any]):
    """A transformers.CLIPImageProcessor doing open_clip's eval transform (or its squash)."""
    from transformers import CLIPImageProcessor

    size = int(preprocess_cfg["size"])
    squash = preprocess_cfg.get("resize_mode", "shortest") == "squash"
    return CLIPImageProcessor(
        do_resize=True, size={"height": size, "width": size} if squash else {"shortest_edge": size},
        resample=_RESAMPLE[preprocess_cfg.get("interpolation", "bicubic")],
        do_center_crop=not squash, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]), do_convert_rgb=True)


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges in transformers' form, from the vocabulary file shipped with the package;
    ids are open_clip's (SOT 49406, EOT 49407)."""
    path = importlib.resources.files("bioclip_jax") / "assets" / VOCAB_FILE
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(tokens)}, merges


def tokenizer(context_length: int = 77):
    """A transformers.CLIPTokenizer with CLIP's vocabulary. It pads with EOT (as OpenAI's hub repos) where open_clip
    pads with 0; the ids up to EOT are the same for plain text."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def write_transformers_folder(folder: str | os.PathLike, state_dict: Mapping[str, np.ndarray], config: CLIPConfig,
                              preprocess_cfg: dict[str, Any]) -> epath.Path:
    """Writes a folder `transformers.CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` read."""
    from transformers import CLIPProcessor

    if config.text.vocab_size != 49408:
        raise InputError(f"text vocab_size {config.text.vocab_size}: the tokenizer files need CLIP's 49408 tokens")
    folder = paths.resolve(folder)
    paths.make_dirs(folder)
    tensors = {k: np.asarray(v, order="C") for k, v in to_transformers_state_dict(state_dict).items()}
    # transformers refuses safetensors files without the format tag torch writes.
    paths.write_atomic(folder / WEIGHTS[0], save_safetensors(tensors, metadata={"format": "pt"}))
    transformers_config(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=image_processor(preprocess_cfg),
                              tokenizer=tokenizer(config.text.context_length))
    processor.save_pretrained(folder)
    # What older transformers versions and other tools read: the image processor on its own, and the slow
    # tokenizer's vocabulary files (transformers 5 writes only tokenizer.json and processor_config.json).
    processor.image_processor.save_pretrained(folder)
    vocab, merges = clip_bpe()
    paths.write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    paths.write_atomic(folder / "merges.txt",
                       ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"))
    return folder
