"""Analytic FLOP counts (MFU), and metric writers: JSONL and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import os

import jax

from bioclip_jax import hardware, paths
from bioclip_jax.convert import run_dir
from bioclip_jax.models.config import CLIPConfig


def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    per_layer = (2 * tokens * width * 3 * width  # fused qkv
                 + 2 * 2 * tokens * tokens * width  # scores and weighted sum
                 + 2 * tokens * width * width  # out proj
                 + 2 * 2 * tokens * width * int(width * mlp_ratio))  # mlp
    return layers * per_layer


def forward_flops(config: CLIPConfig) -> tuple[float, float]:
    """(image, text) forward FLOPs per example, 2 per multiply-add as open_clip's model_profile.csv
    (ViT-B/16: 35.13 G + 5.96 G)."""
    v, t = config.vision, config.text
    patches = v.grid ** 2
    image = (2 * patches * v.patch_size ** 2 * 3 * v.width + _transformer_flops(patches + 1, v.width, v.layers,
                                                                                 v.mlp_ratio)
             + 2 * v.width * config.embed_dim)
    text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * config.embed_dim
    return float(image), float(text)


def train_flops_per_pair(config: CLIPConfig) -> float:
    """Forward + backward = 3x forward. Rematerialised recomputation is not counted (the MFU convention)."""
    image, text = forward_flops(config)
    return 3 * (image + text)


def peak_flops(device_kind: str) -> float:
    """Dense bf16 FLOP/s of one device from its `device_kind` (`hardware.find`); 0.0 when unknown (MFU 0)."""
    accelerator = hardware.find(device_kind)
    return accelerator.peak_bf16_flops if accelerator else 0.0


def peak_flops_per_device() -> float:
    return peak_flops(jax.devices()[0].device_kind)


class MetricWriter:
    """Writes scalars to the run's JSONL file and TensorBoard event files (tensorboardX, no TensorFlow); process 0 only.

    Object stores (gs://) cannot append: there the JSONL file is rewritten whole at each write (a few hundred lines
    for a whole run), so it is complete after every log interval as a local file is."""

    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = paths.resolve(workdir)
        paths.make_dirs(workdir)
        self._path = workdir / run_dir.METRICS
        self._remote = paths.is_url(workdir)
        if self._remote:
            self._lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
        else:
            self._jsonl = self._path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / run_dir.TENSORBOARD))  # tensorboardX writes gs:// itself
        except ImportError:
            self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": step, **scalars}) + "\n"
        if self._remote:
            self._lines.append(line)
            self._path.write_text("".join(self._lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            if not self._remote:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
