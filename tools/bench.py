#!/usr/bin/env python
"""Side-by-side throughput of bioclip_jax and open_clip (PyTorch) on the same model, batch, precision and device.

    python tools/bench.py encode [--model ViT-B-16] [--batch 32] [--iters 10]

Prints a table (images or texts per second, and bioclip_jax / open_clip ratio). Weights are random: speed does not
depend on them. Both run fp32 on the CPU with the same number of threads.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["encode"])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    import jax
    import torch

    rows = bench_encode(args.model, args.batch, args.iters)
    device = jax.devices()[0]
    print(f"# {args.mode}: {args.model}, batch {args.batch}, fp32, {device.platform} ({platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores), jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {time.strftime('%Y-%m-%d')}")
    print(f"| {'task':<14} | {'bioclip_jax /s':>15} | {'open_clip /s':>13} | {'ratio':>6} |")
    print(f"|{'-' * 16}|{'-' * 17}|{'-' * 15}|{'-' * 8}|")
    for i in range(0, len(rows), 2):
        (task, _, ours), (_, _, theirs) = rows[i], rows[i + 1]
        print(f"| {task:<14} | {ours:>15.1f} | {theirs:>13.1f} | {ours / theirs:>5.2f}x |")


if __name__ == "__main__":
    main()
