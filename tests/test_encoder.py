"""The sharded encoder (inference/encoder.py): on 8 devices, replicated or FSDP-sharded, per-layer or scanned params
give the single-device Model's features and the same validation metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EIGHT_DEVICES = r"""
import io, sys
import jax, numpy as np
from PIL import Image
from bioclip_jax import mesh as mesh_lib
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.evaluate.zero_shot import validation_metrics
from bioclip_jax.inference.encoder import MeshEncoder, mesh_encoder, place_params
from bioclip_jax.inference.model import create_model, encode
from bioclip_jax.models.scan import stack_layers

assert jax.device_count() == 8
folder = sys.argv[1]
rng = np.random.default_rng(0)
with ShardWriter(f"{folder}/val-00000.array_record") as writer:
    for n in range(21):  # 21 images in batches of 6: padded rows in every batch and a short last one
        k = n % 5
        pixels = np.clip(np.array([50 * k, 200 - 40 * k, 120]) + rng.normal(0, 30, (40, 40, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
        taxon = Taxon.from_ranks(["Animalia", "Chordata", "Aves", f"Order{k % 2}", f"Family{k % 3}", f"Genus{k}",
                                 "colorata"], f"bird {k}")
        writer.write(Record(f"r{n}", buf.getvalue(), taxon))

model = create_model("tiny", seed=3)
mesh = mesh_lib.make_mesh()
encoders = {"replicated": mesh_encoder(model, mesh),
            "fsdp, scanned": MeshEncoder(model.config, place_params(stack_layers(jax.device_get(model.params)), mesh,
                                                                    fsdp=True), model.preprocess, mesh)}
sharded = encoders["fsdp, scanned"].params["text"]["token_embedding"]["embedding"]
assert not sharded.sharding.is_fully_replicated and len(sharded.addressable_shards[0].data) * 8 == len(sharded)

pixels = rng.normal(size=(5, 64, 64, 3)).astype(np.float32)
texts = ["a photo of Aves", "bird 3", "Genus2 colorata"]
reference = (model.encode_pixels(pixels), encode(model, texts=texts), validation_metrics(model, folder, 6, 6))
assert set(reference[2]) == {"val/loss", *(f"val/zero_shot_{r}_top1" for r in
                                           ("kingdom", "phylum", "class", "order", "family", "genus", "species"))}
for name, encoder in encoders.items():
    np.testing.assert_allclose(encoder.encode_pixels(pixels), reference[0], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(encode(encoder, texts=texts), reference[1], atol=1e-5, err_msg=name)
    metrics = validation_metrics(encoder, folder, 6, 6)
    assert metrics.keys() == reference[2].keys(), name
    for key in metrics:
        assert abs(metrics[key] - reference[2][key]) < 1e-5, (name, key, metrics[key], reference[2][key])
print("ok", reference[2])
"""


@pytest.mark.integration  # a subprocess with 8 devices
def test_mesh_encoder_on_8_devices_equals_the_single_device_model(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
