#!/usr/bin/env python
"""Side-by-side throughput of bioclip_jax and open_clip (PyTorch) on the same work, in one run.

    python tools/bench.py encode [--model ViT-B-16] [--batch 32] [--iters 10]
    python tools/bench.py pipeline [--batch 32] [--iters 20]      # needs `pip install webdataset`
    python tools/bench.py train [--model demo] [--batch 64] [--iters 10]

encode: image and text embedding throughput on the same model config, batch, precision (fp32) and device; weights are
random (speed does not depend on them). pipeline: the training input pipeline in one process (no worker processes):
bioclip_jax's Grain pipeline over ArrayRecord shards against open_clip's webdataset recipe over tar shards of the same
JPEGs, both RandomResizedCrop(224, scale 0.9-1.0, bicubic) + tokenizing; and the tokenizers alone. train: one
training step (forward, symmetric CLIP loss, backward, AdamW) on the same model config and batch, fp32: bioclip_jax's
jitted step against open_clip's model + ClipLoss + torch.optim.AdamW. Prints a table with the bioclip_jax / open_clip
ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def _time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_encode(model_name: str, batch: int, iters: int) -> list[tuple[str, str, float]]:
    import jax
    import open_clip
    import torch

    import bioclip_jax

    model = bioclip_jax.create_model(model_name)
    size = model.config.vision.image_size
    pixels = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    tokens = bioclip_jax.tokenize(["a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia."] * batch)
    pixels_dev, tokens_dev = jax.device_put(pixels), jax.device_put(tokens)

    torch_model = open_clip.create_model(model_name).eval()
    pixels_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    tokens_t = torch.from_numpy(tokens.astype(np.int64))

    rows = []
    with torch.inference_mode():
        for what, ours, theirs in [
            ("image encode", lambda: model._encode_image(model.params, pixels_dev).block_until_ready(),
             lambda: torch_model.encode_image(pixels_t)),
            ("text encode", lambda: model._encode_text(model.params, tokens_dev).block_until_ready(),
             lambda: torch_model.encode_text(tokens_t)),
        ]:
            rows.append((what, "bioclip_jax", batch / _time(ours, iters)))
            rows.append((what, "open_clip", batch / _time(theirs, iters)))
    return rows


def _pipeline_data(folder: str) -> tuple[str, list[str]]:
    """Synthetic organisms drawn at 224 px, as ArrayRecord shards and as webdataset tars with the same JPEG bytes."""
    import io
    import tarfile

    from bioclip_jax.data.records import find_shards, read_records
    from bioclip_jax.data.synthetic import SyntheticConfig
    from bioclip_jax.data.writers import write_synthetic_shards

    write_synthetic_shards(folder, SyntheticConfig(n_species=50, images_per_species=20, image_size=224),
                           records_per_shard=250, verbose=False)
    shards = find_shards(os.path.join(folder, "train"))
    tars = []
    for i, shard in enumerate(shards):
        tars.append(os.path.join(folder, f"shard-{i:06d}.tar"))
        with tarfile.open(tars[-1], "w") as tar:
            for record in read_records([shard]):
                key = record.id.replace("/", "_").replace(".", "_")
                for ext, data in (("jpg", record.image), ("taxon_com.txt", record.taxon.text("taxon_com").encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "train"), tars


def bench_pipeline(batch: int, iters: int) -> list[tuple[str, str, float]]:
    import tempfile

    import open_clip
    import webdataset as wds

    from bioclip_jax.data.pipeline import train_dataset
    from bioclip_jax.tokenizer import tokenize

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        shards, tars = _pipeline_data(folder)
        ours = iter(train_dataset(shards, global_batch_size=batch, image_size=224, text_type="taxon_com",
                                  process_index=0, process_count=1))
        transform = open_clip.image_transform(224, is_train=True, aug_cfg={"scale": (0.9, 1.0)})
        theirs = iter(wds.WebDataset(tars, shardshuffle=False, empty_check=False).repeat().shuffle(1000)
                      .decode("pilrgb").to_tuple("jpg", "taxon_com.txt")
                      .map_tuple(transform, lambda text: open_clip.tokenize([text])[0]).batched(batch))
        rows.append(("input pipeline", "bioclip_jax", batch / _time(lambda: next(ours), iters)))
        rows.append(("input pipeline", "open_clip", batch / _time(lambda: next(theirs), iters)))
    from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife

    captions = [t.text(k) for t in SyntheticTreeOfLife(SyntheticConfig()).species
                for k in ("sci", "com", "taxon", "sci_com", "taxon_com")] * 10
    rows.append(("tokenizer", "bioclip_jax", len(captions) / _time(lambda: tokenize(captions), 3, warmup=1)))
    rows.append(("tokenizer", "open_clip", len(captions) / _time(lambda: open_clip.tokenize(captions), 3, warmup=1)))
    return rows


def bench_train(model_name: str, batch: int, iters: int) -> list[tuple[str, str, float]]:
    import jax
    import jax.numpy as jnp
    import open_clip
    import torch

    import bioclip_jax
    from bioclip_jax.models import CLIP
    from bioclip_jax.train.optimizer import make_optimizer
    from bioclip_jax.train.trainer import make_train_step

    model = bioclip_jax.create_model(model_name)
    size, context = model.config.vision.image_size, model.config.text.context_length
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tokens = bioclip_jax.tokenize(["a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia."] * batch,
                                  context)
    tx, schedule = make_optimizer(model.params, lr=1e-4, warmup_steps=10, total_steps=1000)
    step = jax.jit(make_train_step(CLIP(model.config), tx, schedule, "openai"), donate_argnums=(0,))
    state = {"step": jnp.zeros((), jnp.int32), "params": model.params, "opt_state": tx.init(model.params),
             "rng": jnp.zeros(2, jnp.uint32)}
    batch_dev = {"image": jax.device_put(images), "tokens": jax.device_put(tokens)}

    def ours():
        nonlocal state
        state, metrics = step(state, batch_dev)
        metrics["loss"].block_until_ready()

    torch_model = open_clip.CLIP(**model.config.to_open_clip()).train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (bioclip_jax.data.transforms.OPENAI_MEAN,
                                                            bioclip_jax.data.transforms.OPENAI_STD))
    images_t = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens_t = torch.from_numpy(tokens.astype(np.int64))

    def theirs():
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = torch_model(images_t, tokens_t)
        loss_fn(image_features, text_features, logit_scale).backward()
        optimizer.step()

    return [("train step", "bioclip_jax", batch / _time(ours, iters)),
            ("train step", "open_clip", batch / _time(theirs, iters))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["encode", "pipeline", "train"])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    import jax
    import torch

    if args.mode == "encode":
        rows = bench_encode(args.model, args.batch, args.iters)
        what = f"{args.model}, batch {args.batch}, fp32"
    elif args.mode == "train":
        rows = bench_train(args.model, args.batch, args.iters)
        what = f"{args.model}, batch {args.batch}, fp32, AdamW"
    else:
        rows = bench_pipeline(args.batch, args.iters)
        what = f"224 px RandomResizedCrop + tokenize, batch {args.batch}, 1 process; tokenizer: 10,000 captions"
    device = jax.devices()[0]
    print(f"# {args.mode}: {what}, {device.platform} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores), "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"| {'task':<15} | {'bioclip_jax /s':>15} | {'open_clip /s':>13} | {'ratio':>6} |")
    print(f"|{'-' * 17}|{'-' * 17}|{'-' * 15}|{'-' * 8}|")
    for i in range(0, len(rows), 2):
        (task, _, ours), (_, _, theirs) = rows[i], rows[i + 1]
        print(f"| {task:<15} | {ours:>15.1f} | {theirs:>13.1f} | {ours / theirs:>5.2f}x |")


if __name__ == "__main__":
    main()
