"""Model configs with open_clip's names and JSON fields, so an `open_clip_config.json` maps 1:1.

A config is the `model_cfg` dict of open_clip (`embed_dim`, `quick_gelu`, `vision_cfg`, `text_cfg`). Fields that would
change the architecture in a way this implementation does not reproduce are rejected instead of ignored: a silently
different model is worse than an error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any

from bioclip_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image tower; defaults are open_clip's CLIPVisionCfg (ViT-B/16)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64  # heads = width / head_width
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The causal text tower; defaults are open_clip's CLIPTextCfg."""

    context_length: int = 77  # tokens, start and end of text included
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


# open_clip's defaults for the fields we implement, by JSON name.
_VISION_DEFAULTS = dataclasses.asdict(VisionConfig())
_TEXT_DEFAULTS = dataclasses.asdict(TextConfig())

# open_clip's custom attention block switches (open_clip/model.py); all off in the CLIP/BioCLIP family.
_BLOCK_NEUTRAL = dict(qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                      scale_attn=False, scale_fc=False)
# Fields open_clip knows that we accept only at their default (or neutral) value: anything else is another architecture.
_VISION_NEUTRAL = dict(
    ls_init_value=None, patch_dropout=0.0, attentional_pool=False, no_ln_pre=False, pos_embed_type="learnable",
    final_ln_after_pool=False, pool_type="tok", output_tokens=False, act_kwargs=None, norm_kwargs=None,
    timm_model_name=None, timm_model_pretrained=False, timm_pool="avg", timm_proj="linear", timm_proj_bias=False,
    timm_drop=0.0, timm_drop_path=None, attn_pooler_queries=256, attn_pooler_heads=8, block_type=None,
    **_BLOCK_NEUTRAL,
)
_TEXT_NEUTRAL = dict(
    ls_init_value=None, hf_model_name=None, hf_model_pretrained=True, hf_proj_type="mlp", hf_pooler_type="mean_pooler",
    embed_cls=False, pad_id=0, no_causal_mask=False, final_ln_after_pool=False, pool_type="argmax", proj_bias=False,
    proj_type="linear", output_tokens=False, act_kwargs=None, norm_kwargs=None, block_type=None,
    **_BLOCK_NEUTRAL,
)
# Fields that change nothing in the network itself (eos_id only matters for pool_type "eos").
_TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "eos_id"}
_TOP_FIELDS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "cast_dtype", "init_logit_scale",
               "init_logit_bias", "nonscalar_logit_scale"}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a two-tower CLIP. `name` is the open_clip model name (informational)."""

    embed_dim: int = 512
    quick_gelu: bool = False
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    # open_clip's CustomTextCLIP keeps the text tower under `text.`; plain CLIP keeps it at the top level.
    custom_text: bool = False
    name: str = ""

    @classmethod
    def from_open_clip(cls, model_cfg: dict[str, Any], name: str = "") -> "CLIPConfig":
        """Builds a config from an open_clip `model_cfg` dict, rejecting fields we do not reproduce."""
        where = f"model config {name!r}" if name else "model config"
        if not isinstance(model_cfg, dict):
            raise InputError(f"{where}: expected an object of fields, got {type(model_cfg).__name__}")
        unknown = set(model_cfg) - _TOP_FIELDS
        if unknown:
            raise InputError(f"{where}: unsupported field(s) {sorted(unknown)}; supported: {sorted(_TOP_FIELDS)}")
        if model_cfg.get("init_logit_bias") is not None:
            raise InputError(f"{where}: init_logit_bias is a SigLIP model; only CLIP (softmax) models are supported")
        if model_cfg.get("nonscalar_logit_scale"):
            raise InputError(f"{where}: nonscalar_logit_scale is not supported")
        vision = _parse_tower(model_cfg.get("vision_cfg", {}), _VISION_DEFAULTS, _VISION_NEUTRAL, set(),
                              f"{where} vision_cfg")
        text = _parse_tower(model_cfg.get("text_cfg", {}), _TEXT_DEFAULTS, _TEXT_NEUTRAL, _TEXT_IGNORED,
                            f"{where} text_cfg")
        if vision["width"] % vision["head_width"]:
            raise InputError(f"{where}: vision width {vision['width']} is not a multiple of head_width "
                             f"{vision['head_width']}")
        if text["width"] % text["heads"]:
            raise InputError(f"{where}: text width {text['width']} is not a multiple of heads {text['heads']}")
        return cls(embed_dim=_number(model_cfg.get("embed_dim"), int, where, "embed_dim"),
                   quick_gelu=_flag(model_cfg.get("quick_gelu", False), where, "quick_gelu"),
                   vision=VisionConfig(**vision), text=TextConfig(**text),
                   custom_text=_flag(model_cfg.get("custom_text", False), where, "custom_text"), name=name)

    def to_open_clip(self) -> dict[str, Any]:
        """The `model_cfg` dict open_clip reads (only the fields that differ from nothing: all of ours, explicitly)."""
        cfg: dict[str, Any] = {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.vision.image_size, "layers": self.vision.layers,
                           "width": self.vision.width, "patch_size": self.vision.patch_size},
            "text_cfg": {"context_length": self.text.context_length, "vocab_size": self.text.vocab_size,
                         "width": self.text.width, "heads": self.text.heads, "layers": self.text.layers},
        }
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        if self.custom_text:
            cfg["custom_text"] = True
        if self.vision.head_width != 64:
            cfg["vision_cfg"]["head_width"] = self.vision.head_width
        if self.vision.mlp_ratio != 4.0:
            cfg["vision_cfg"]["mlp_ratio"] = self.vision.mlp_ratio
        if self.text.mlp_ratio != 4.0:
            cfg["text_cfg"]["mlp_ratio"] = self.text.mlp_ratio
        return cfg


def _number(value, kind: type, where: str, key: str) -> int | float:
    """A positive int (or, for float fields, any positive number): JSON's numbers, not strings or booleans."""
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
    if not ok:
        raise InputError(f"{where}: {key}={value!r}: expected a positive {'number' if kind is float else 'integer'}")
    return kind(value)


def _flag(value, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where}: {key}={value!r}: expected true or false")
    return value


def _parse_tower(cfg: dict[str, Any], defaults: dict, neutral: dict, ignored: set, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected an object of fields, got {type(cfg).__name__}")
    out = dict(defaults)
    for key, value in cfg.items():
        if key in defaults:
            out[key] = _number(value, type(defaults[key]), where, key)
        elif key in neutral:
            if value != neutral[key] and not (neutral[key] is None and value in ({}, None)):
                raise InputError(f"{where}: {key}={value!r} is not supported (only {neutral[key]!r})")
        elif key not in ignored:
            close = difflib.get_close_matches(key, list(defaults) + list(neutral), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise InputError(f"{where}: unknown field {key!r}{hint}")
    return out


def _vit(embed_dim, image, layers, width, patch, text_width, text_heads, text_layers=12, quick_gelu=False):
    return {"embed_dim": embed_dim, **({"quick_gelu": True} if quick_gelu else {}),
            "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads,
                         "layers": text_layers}}


# open_clip's model configs (src/open_clip/model_configs/*.json) for the architectures BioCLIP users meet.
_OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 1024, 16, text_layers=24),
}
_OPEN_CLIP_CONFIGS["ViT-H-14"]["vision_cfg"]["head_width"] = 80
for _name in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"]:
    _OPEN_CLIP_CONFIGS[_name + "-quickgelu"] = {**copy.deepcopy(_OPEN_CLIP_CONFIGS[_name]), "quick_gelu": True}
# A tiny CLIP for tests and the CPU demo: real tokenizer (vocab 49408, context 77), small towers.
_OPEN_CLIP_CONFIGS["tiny"] = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# The CPU demo's model (configs/demo.py), sized to train in minutes on 2 cores: 64 px images in 16 px patches,
# a 4-layer image tower, a 2-layer text tower over 64 tokens (the synthetic captions need at most 53).
_OPEN_CLIP_CONFIGS["demo"] = {
    "embed_dim": 128, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}

# BioCLIP-lineage aliases (BioCLIP v1 = OpenAI ViT-B/16 with QuickGELU; BioCLIP 2 = ViT-L/14 with GELU).
ALIASES = {"bioclip": "ViT-B-16-quickgelu", "bioclip-2": "ViT-L-14"}


def list_models() -> list[str]:
    return sorted(_OPEN_CLIP_CONFIGS) + sorted(ALIASES)


def get_model_config(name: str) -> CLIPConfig:
    """Config for an open_clip model name (e.g. "ViT-B-16-quickgelu") or one of `ALIASES`. A JSON config file is read
    by `convert.files.load_model_config`, which also takes names."""
    key = ALIASES.get(name, name)
    if key not in _OPEN_CLIP_CONFIGS:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise InputError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return CLIPConfig.from_open_clip(copy.deepcopy(_OPEN_CLIP_CONFIGS[key]), name=key)


def config_from_json_dict(data: dict[str, Any], source: str) -> CLIPConfig:
    """The config in an open_clip model JSON's contents (`model_configs/*.json`) or a folder config's
    (`{"model_cfg": ...}`); `source` names the file in errors."""
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or "embed_dim" not in model_cfg:
        raise InputError(f"{source}: no 'embed_dim' (expected an open_clip model config or "
                         "{'model_cfg': ..., 'preprocess_cfg': ...})")
    return CLIPConfig.from_open_clip(model_cfg, name=data.get("model_name", ""))
