"""open_clip state_dict <-> bioclip_jax params: a naming table plus three layout rules.

Every flax leaf path maps to exactly one open_clip key:
  visual/transformer/resblocks_3/attn/in_proj/kernel  <->  visual.transformer.resblocks.3.attn.in_proj_weight
  text/ln_final/scale                                  <->  ln_final.weight   (text.ln_final.weight for custom_text)
Layouts: Linear (out, in) <-> Dense kernel (in, out); Conv (O, I, H, W) <-> (H, W, I, O); everything else as is.
Transposes are exact, so open_clip -> jax -> open_clip gives back the same bits.
A scanned model's params (blocks stacked under `resblocks`, models/scan.py) are unstacked on the way out and stacked on
the way in (`scan_layers=True`); the table itself only ever sees the per-layer layout.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import traverse_util

from bioclip_jax.errors import InputError
from bioclip_jax.models.clip import init_params, without_continual_proj
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.scan import stack_layers, unstack_layers

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Metadata entries of OpenAI's original CLIP state dicts, not tensors of the network.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# BioCLIP 2's replay head: in its fork's training checkpoints, never in a released model (open_clip, whose loading is
# strict, would refuse it). Read past on the way in, left out on the way out.
CONTINUAL_PROJ_KEY = "visual.continual_proj"


class StateDictMismatch(InputError):
    """The weights do not fit the architecture: names the missing, unexpected and mis-shaped keys, in one line."""

    @classmethod
    def listing(cls, what: str, groups: Mapping[str, list[str]], hint: str = "") -> StateDictMismatch:
        """"WHAT: N missing keys: a, b; N wrong shapes: ...", each group cut to its first few keys."""
        parts = [f"{len(items)} {title}: {', '.join(items[:5])}" + (f" and {len(items) - 5} more" if len(items) > 5
                                                                     else "")
                 for title, items in groups.items() if items]
        return cls(f"{what}: " + "; ".join(parts) + (f"; {hint}" if hint else ""))


def torch_key(path: tuple[str, ...], custom_text: bool = False) -> str:
    """open_clip state_dict key of a flax parameter path."""
    parts = [p.replace("resblocks_", "resblocks.") for p in path]
    if parts[0] == "text" and not custom_text:
        parts = parts[1:]  # plain CLIP keeps the text tower at the top level
    if parts[-2:] in (["in_proj", "kernel"], ["in_proj", "bias"]):
        # torch.nn.MultiheadAttention stores the fused projection as in_proj_weight / in_proj_bias
        parts[-2:] = ["in_proj_" + ("weight" if parts[-1] == "kernel" else "bias")]
    else:
        parts[-1] = _LEAF_NAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


# Flax kernel axes in torch's order: Linear (in, out) -> (out, in); Conv (H, W, I, O) -> (O, I, H, W).
_TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    axes = _TORCH_AXES.get(value.ndim) if path[-1] == "kernel" else None
    return value if axes is None else value.transpose(axes)


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    axes = _TORCH_AXES.get(value.ndim) if path[-1] == "kernel" else None
    return value if axes is None else value.transpose(np.argsort(axes))


def param_shapes(config: CLIPConfig, scan_layers: bool = False) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {flax path: shape} of a model's params, computed without allocating them (stacked if `scan_layers`)."""
    shapes = jax.eval_shape(lambda: init_params(config, scan_layers=scan_layers))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def expected_state_dict_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """open_clip key -> shape, as `open_clip.create_model(...).state_dict()` would have it."""
    return {torch_key(path, config.custom_text): _torch_shape(path, shape)
            for path, shape in param_shapes(config).items()}


def clean_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undoes the wrappers open_clip also undoes: DDP's `module.` prefix and OpenAI's metadata entries; drops BioCLIP
    2's training-only `visual.continual_proj` (its fork drops it too when the model has no replay head)."""
    keys = list(state_dict)
    strip = bool(keys) and keys[0].startswith("module.")
    out = {}
    for key, value in state_dict.items():
        if strip and key.startswith("module."):
            key = key[len("module."):]
        if key in _OPENAI_METADATA_KEYS or key == CONTINUAL_PROJ_KEY:
            continue
        out[key] = value
    return out


def from_open_clip(state_dict: Mapping[str, np.ndarray], config: CLIPConfig, scan_layers: bool = False) -> dict:
    """open_clip state_dict (numpy arrays) -> nested flax params (numpy, float32 for float inputs), per layer, or
    stacked for a `scan_layers` model."""
    state_dict = clean_state_dict(state_dict)
    custom_text = config.custom_text
    if not custom_text and any(k.startswith("text.") for k in state_dict):
        custom_text = True  # a CustomTextCLIP checkpoint of a plain CLIP architecture: same tensors, other prefix
    paths = param_shapes(config)
    check_state_dict(state_dict, {torch_key(p, custom_text): _torch_shape(p, s) for p, s in paths.items()},
                     config.name)
    flat = {}
    for path, shape in paths.items():
        value = np.asarray(state_dict[torch_key(path, custom_text)])
        if value.ndim == 1 and shape == ():  # old checkpoints store logit_scale as shape [1]
            value = value.reshape(())
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            value = value.astype(np.float32)  # params are float32; fp16/bf16 upcasts are exact
        flat[path] = np.asarray(_to_flax_layout(path, value), order="C")
    params = traverse_util.unflatten_dict(flat)
    return stack_layers(params) if scan_layers else params


def to_open_clip(params: Mapping, config: CLIPConfig) -> dict[str, np.ndarray]:
    """Nested flax params, per layer or stacked -> open_clip state_dict of contiguous numpy arrays (same dtype as the
    params). A BioCLIP 2 run's replay head (`visual/continual_proj`) is left out, as in BioCLIP 2's release: the
    exported model is `proj`'s."""
    # One transfer per stacked array, then host slices.
    host = jax.tree_util.tree_map(np.asarray, dict(without_continual_proj(params)))
    flat = traverse_util.flatten_dict(unstack_layers(host))
    return {torch_key(path, config.custom_text): np.asarray(_to_torch_layout(path, value), order="C")
            for path, value in flat.items()}


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _TORCH_AXES.get(len(shape)) if path[-1] == "kernel" else None
    return shape if axes is None else tuple(shape[a] for a in axes)


def check_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                     model_name: str = "") -> None:
    """Raises StateDictMismatch listing every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = []
    for key in expected:
        if key in state_dict:
            got = tuple(np.shape(state_dict[key]))
            want = expected[key]
            if got != want and not (want == () and got == (1,)):
                wrong.append(f"{key}: got {got}, expected {want}")
    if not (missing or unexpected or wrong):
        return
    what = f"the weights do not match model {model_name!r}" if model_name else "the weights do not match the config"
    fits = fitting_architectures(state_dict)
    raise StateDictMismatch.listing(what, {"missing keys": [f"{k} (expected shape {expected[k]})" for k in missing],
                                           "unexpected keys": unexpected, "wrong shapes": wrong},
                                    hint=f"these weights fit: {', '.join(fits)}" if fits else "")


def fitting_architectures(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """The registered architectures whose shapes fit these weights, to help pick `model=`."""
    from bioclip_jax.models.config import ALIASES, get_model_config, list_models

    sd_shapes = {k: tuple(np.shape(v)) for k, v in clean_state_dict(state_dict).items()}
    fits = []
    for name in list_models():
        if name in ALIASES:
            continue
        try:
            config = get_model_config(name)
        except ValueError:
            continue
        # Tracing an architecture's init takes seconds (ViT-H): only for those whose patch embedding fits.
        vision = config.vision
        if sd_shapes.get("visual.conv1.weight") != (vision.width, 3, vision.patch_size, vision.patch_size):
            continue
        expected = expected_state_dict_shapes(config)
        if expected.keys() == sd_shapes.keys() and all(
                sd_shapes[k] == s or (s == () and sd_shapes[k] == (1,)) for k, s in expected.items()):
            fits.append(name)
    return fits

