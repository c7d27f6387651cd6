#!/usr/bin/env python
"""Side-by-side throughput of bioclip_jax and open_clip (PyTorch) on the same work, in one run.

    python tools/bench.py encode [--model ViT-B-16] [--batch 32] [--iters 10] [--dtype bfloat16 --attn cudnn]
    python tools/bench.py pipeline [--batch 32] [--iters 20]      # needs `pip install webdataset`
    python tools/bench.py train [--model demo] [--batch 64] [--iters 10] [--dtype bfloat16 --attn cudnn --remat dots]
    python tools/bench.py gpu [--out gpu_bench.md]                # every GPU measurement, one table
    python tools/bench.py cli [--iters 5]                         # wall time of the CLI's answers that start no JAX
    python tools/bench.py finetune [--out runs/bench_finetune]    # zero-shot, probe, vision-only, LoRA, full
    python tools/bench.py embed [--model ViT-B-16] [--batch 32] [--images 128] [--iters 1]   # JPEGs -> Parquet
    python tools/bench.py decode [--images 200]                   # host decode + preprocess per core; TPU hosts

encode: image and text embedding throughput on the same model config, batch, precision and device (open_clip runs
on CUDA when there is one); weights are random (speed does not depend on them). pipeline: the training input pipeline
in one process (no worker processes): bioclip_jax's Grain pipeline over ArrayRecord shards against open_clip's
webdataset recipe over tar shards of the same JPEGs, both RandomResizedCrop(224, scale 0.9-1.0, bicubic) +
tokenizing; and the tokenizers alone. train: one training step (forward, symmetric CLIP loss, backward, AdamW) on
the same model config and batch: bioclip_jax's jitted step against open_clip's model + ClipLoss +
torch.optim.AdamW (bfloat16 = bf16 compute against open_clip's AMP bf16). The two sides' calls alternate, and the
table shows medians and the bioclip_jax / open_clip ratio. gpu: ViT-B-16 bf16 encode and training steps at growing
batches, with and without remat (open_clip: gradient checkpointing), each side in its own process; prints and
writes a markdown table with MFU. cli: `bioclip-jax --help`, `--version`, `predict --help` and a bad argument, each
in a fresh process, against a bare `python -c pass`: parsing imports no JAX, so they answer in interpreter start-up
time plus a few milliseconds. search: nearest neighbours among synthetic 768-d embeddings (clustered, as real ones
are; stored float16), the queries fresh points from the same clusters: `bioclip-jax search`'s exact top-k on device
(float32 and bf16 banks), its faiss IVF index at a few nprobe, and numpy brute force in blocks (what a user writes
by hand), each with queries/s and recall@10 against exact float32 search.
embed: `bioclip-jax embed FOLDER --output X.parquet` end to end (decode, open_clip's
eval preprocessing, encode, normalise, Parquet) against open_clip with a torch DataLoader (2 worker processes) doing
the same job into the same Parquet layout; both warmed up on one batch first (compiles). decode: CPU time per image
of one thread decoding and preprocessing JPEG photos (both preprocessings), and the cores a TPU host needs to feed
its chips when embedding (forward only, 40% MFU).
finetune: the demo recipe's model (trained on the synthetic tree of life, or
--base FOLDER) fine-tuned on the species the demo never trained on (the tree's held-out species, 16 new images each
to train on and 16 held out, a CSV with their ranks) by each method of `bioclip-jax finetune`, one after the other:
held-out accuracy, retention (zero-shot species top-1 on 10 new images of each of the 180 species the demo trained
on) and wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def _time_pair(ours, theirs, iters: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of each function, calls alternating (ours, theirs, ours, ...) so that a shared
    machine's drifting load hits both sides alike. A side given as None is skipped (its time is nan)."""
    fns = [fn or (lambda: None) for fn in (ours, theirs)]
    for _ in range(warmup):
        fns[0](), fns[1]()
    times = ([], [])
    for _ in range(iters):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return tuple(float(np.median(t)) if fn else float("nan") for fn, t in zip((ours, theirs), times))


SIDES = ("bioclip_jax", "open_clip")


def _torch_setup(dtype: str):
    """(device, autocast context factory) for open_clip: CUDA when present; AMP bf16 as open_clip's
    --precision amp_bf16."""
    import contextlib

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "float32":
        return device, contextlib.nullcontext
    return device, lambda: torch.autocast(device, dtype=torch.bfloat16)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_encode(model_name: str, batch: int, iters: int, dtype: str = "float32", attn: str = "xla",
                 sides: tuple[str, ...] = SIDES) -> list[tuple[str, str, float]]:
    import jax.numpy as jnp
    import open_clip
    import torch

    import bioclip_jax

    model = bioclip_jax.create_model(model_name, dtype=getattr(jnp, dtype), attn_implementation=attn)
    size = model.config.vision.image_size
    pixels = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    tokens = bioclip_jax.tokenize(["a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia."] * batch,
                                  model.config.text.context_length)
    pixels_dev, tokens_dev = jnp.asarray(pixels), jnp.asarray(tokens)

    device, autocast = _torch_setup(dtype)
    torch_model = open_clip.CLIP(**model.config.to_open_clip()).to(device).eval()
    pixels_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device)
    tokens_t = torch.from_numpy(tokens.astype(np.int64)).to(device)

    def theirs(encode, inputs):
        with torch.inference_mode(), autocast():
            encode(inputs)
        _sync(device)

    rows = []
    for what, ours, encode, inputs in [
        ("image encode", lambda: model._encode_image(model.params, pixels_dev).block_until_ready(),
         torch_model.encode_image, pixels_t),
        ("text encode", lambda: model._encode_text(model.params, tokens_dev).block_until_ready(),
         torch_model.encode_text, tokens_t),
    ]:
        ours_s, theirs_s = _time_pair(ours if "bioclip_jax" in sides else None,
                                      (lambda: theirs(encode, inputs)) if "open_clip" in sides else None, iters)
        rows += [(what, "bioclip_jax", batch / ours_s), (what, "open_clip", batch / theirs_s)]
    return rows


def _pipeline_data(folder: str) -> tuple[str, list[str]]:
    """Synthetic organisms drawn at 224 px, as ArrayRecord shards and as webdataset tars with the same JPEG bytes."""
    import io
    import tarfile

    from bioclip_jax.data.records import find_shards, read_records
    from bioclip_jax.data.synthetic import SyntheticConfig
    from bioclip_jax.shards import SyntheticTree, make_shards

    make_shards(SyntheticTree(SyntheticConfig(n_species=50, images_per_species=20, image_size=224)), folder,
                records_per_shard=250, progress=False)
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
        # One side at a time: Grain prefetches in background threads, which would fill up while open_clip runs.
        ours_s = _time_pair(lambda: next(ours), None, iters)[0]
        theirs_s = _time_pair(None, lambda: next(theirs), iters)[1]
        rows += [("input pipeline", "bioclip_jax", batch / ours_s), ("input pipeline", "open_clip", batch / theirs_s)]
    from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife

    captions = [t.text(k) for t in SyntheticTreeOfLife(SyntheticConfig()).species
                for k in ("sci", "com", "taxon", "sci_com", "taxon_com")] * 10
    ours_s, theirs_s = _time_pair(lambda: tokenize(captions), lambda: open_clip.tokenize(captions), 3, warmup=1)
    rows += [("tokenizer", "bioclip_jax", len(captions) / ours_s), ("tokenizer", "open_clip", len(captions) / theirs_s)]
    return rows


def bench_train(model_name: str, batch: int, iters: int, dtype: str = "float32", attn: str = "xla",
                remat: str = "", torch_checkpointing: bool = False,
                sides: tuple[str, ...] = SIDES) -> list[tuple[str, str, float]]:
    """One training step each (forward, symmetric CLIP loss, backward, AdamW), fp32 params; `dtype` bfloat16 means
    bf16 compute (bioclip_jax) and AMP bf16 (open_clip)."""
    import jax
    import jax.numpy as jnp
    import open_clip
    import torch

    import bioclip_jax
    from bioclip_jax.models import CLIP
    from bioclip_jax.train.optimizer import make_optimizer
    from bioclip_jax.train.trainer import make_train_step

    config = bioclip_jax.get_model_config(model_name)
    size, context = config.vision.image_size, config.text.context_length
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tokens = bioclip_jax.tokenize(["a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia."] * batch,
                                  context)

    def ours_setup():
        params = bioclip_jax.create_model(config).params
        tx, schedule = make_optimizer(params, lr=1e-4, warmup_steps=10, total_steps=1000)
        module = CLIP(config, dtype=getattr(jnp, dtype), attn_implementation=attn, remat=remat or None)
        step = jax.jit(make_train_step(module, tx, schedule, "openai"), donate_argnums=(0,))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        batch_dev = {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens)}

        def ours():
            nonlocal state
            state, metrics = step(state, batch_dev)
            metrics["loss"].block_until_ready()
        return ours

    device, autocast = _torch_setup(dtype)
    torch_model = open_clip.CLIP(**config.to_open_clip()).to(device).train()
    torch_model.set_grad_checkpointing(torch_checkpointing)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (bioclip_jax.data.transforms.OPENAI_MEAN,
                                                                           bioclip_jax.data.transforms.OPENAI_STD))
    images_t = (torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens_t = torch.from_numpy(tokens.astype(np.int64)).to(device)

    def theirs():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            image_features, text_features, logit_scale = torch_model(images_t, tokens_t)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        _sync(device)

    ours_s, theirs_s = _time_pair(ours_setup() if "bioclip_jax" in sides else None,
                                  theirs if "open_clip" in sides else None, iters)
    return [("train step", "bioclip_jax", batch / ours_s), ("train step", "open_clip", batch / theirs_s)]


GPU_RUNS = [  # (what, mode, kwargs): ViT-B-16, bf16; the training step at growing per-device batches
    ("image+text encode, batch 1024, cudnn attention", "encode", dict(batch=1024, attn="cudnn")),
    *[(f"train step, batch {b}, cudnn attention, no remat / no checkpointing", "train", dict(batch=b, attn="cudnn"))
      for b in (256, 512)],
    *[(f"train step, batch {b}, xla attention, no remat / no checkpointing", "train", dict(batch=b, attn="xla"))
      for b in (256,)],
    *[(f"train step, batch {b}, cudnn attention, remat dots / grad checkpointing", "train",
       dict(batch=b, attn="cudnn", remat="dots", torch_checkpointing=True)) for b in (512, 1024)],
]


def bench_gpu_side(side: str, iters: int, model: str = "ViT-B-16") -> dict:
    """All of GPU_RUNS for one side, in this process (which then holds the GPU alone): {what: [throughputs]}."""
    import gc

    import jax
    import torch

    from bioclip_jax.errors import first_line

    results = {}
    for what, mode, kwargs in GPU_RUNS:
        try:
            fn = bench_encode if mode == "encode" else bench_train
            rows = fn(model, iters=iters, dtype="bfloat16", sides=(side,), **kwargs)
            results[what] = [value for _, name, value in rows if name == side]
        except Exception as e:  # out of memory, most likely: say so and go on with the next configuration
            results[what] = first_line(e)[:160]
        print(side, what, results[what], flush=True)
        gc.collect()
        jax.clear_caches()
        torch.cuda.empty_cache()
    return results


def bench_gpu(iters: int, out: str, model: str = "ViT-B-16") -> str:
    """Every GPU measurement of docs/performance.md: each side in its own process, so each has the whole GPU (JAX
    preallocation is off so that nothing else is reserved), then one markdown table written to `out`."""
    import collections
    import json
    import subprocess
    import sys

    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    results = {}
    for side in SIDES:
        proc = subprocess.run([sys.executable, __file__, "gpu-side", "--side", side, "--iters", str(iters),
                               "--model", model], env=env, stdout=subprocess.PIPE, text=True)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        results[side] = (json.loads(last) if proc.returncode == 0 and last.startswith("{")
                         else collections.defaultdict(lambda: f"exit status {proc.returncode}"))
    import jax

    from bioclip_jax.models.config import get_model_config
    from bioclip_jax.train.metrics import peak_flops_per_device, train_flops_per_pair

    flops = train_flops_per_pair(get_model_config(model))
    peak = peak_flops_per_device()
    lines = [f"# {model} bf16 on {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}",
             "| what | bioclip_jax /s | open_clip /s | ratio | MFU bioclip_jax | MFU open_clip |",
             "|---|---:|---:|---:|---:|---:|"]
    for what, mode, _ in GPU_RUNS:
        ours, theirs = results["bioclip_jax"][what], results["open_clip"][what]
        if isinstance(ours, str) or isinstance(theirs, str):
            lines.append(f"| {what} | {ours if isinstance(ours, str) else f'{ours[0]:,.0f}'} | "
                         f"{theirs if isinstance(theirs, str) else f'{theirs[0]:,.0f}'} | | | |")
            continue
        for i, task in enumerate(["image", "text"] if mode == "encode" else ["train"]):
            util = [f"{100 * flops * v[i] / peak:.1f}%" if mode == "train" and peak else "" for v in (ours, theirs)]
            lines.append(f"| {what} ({task}) | {ours[i]:,.0f} | {theirs[i]:,.0f} | {ours[i] / theirs[i]:.2f}x | "
                         f"{util[0]} | {util[1]} |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return "\n".join(lines)


CLI_COMMANDS = (["--help"], ["--version"], ["predict", "--help"], ["predict", "--bogus", "x.jpg"])


def bench_cli(iters: int) -> list[tuple[str, float]]:
    """Median wall seconds of each CLI command in a fresh `python -m bioclip_jax` process; the first row is Python's
    own start-up (`python -c pass`) for scale."""
    import subprocess
    import sys

    commands = [("python -c pass", [sys.executable, "-c", "pass"])]
    commands += [(f"bioclip-jax {' '.join(a)}", [sys.executable, "-m", "bioclip_jax", *a]) for a in CLI_COMMANDS]
    times = {name: [] for name, _ in commands}
    for _ in range(iters):  # interleaved, so that a shared machine's drifting load hits every command alike
        for name, argv in commands:
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    return [(name, float(np.median(t))) for name, t in times.items()]


def _search_data(rows: int, queries: int, dim: int = 768, noise: float = 1.5):
    """Clustered vectors (float16, as `embed --float16` stores them) and fresh queries from the same clusters:
    uniform noise has no neighbours worth the name. 100 rows a cluster (a species' images in a TreeOfLife-sized
    collection) and noise 1.5 times the spread of the centres put true neighbours in other clusters' lists: with
    1,000 rows a cluster, or noise 1.0, every IVF setting found all of them."""
    clusters = max(1, rows // 100)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    emb = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        emb[start:start + n] = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    picked = centres[rng.integers(0, clusters, queries)]
    return emb, (picked + noise * rng.normal(size=picked.shape)).astype(np.float32)


def _numpy_top_k(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Cosine top k by brute force in numpy, 100,000 rows at a time."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    q = unit(queries)
    best_s, best_i = np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)
    for start in range(0, len(emb), 100_000):
        scores = q @ unit(emb[start:start + 100_000].astype(np.float32)).T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def bench_search(rows: int, queries: int, k: int = 10) -> list[tuple[str, float, float, float]]:
    """(method, build or load s, queries/s, recall@10 against exact float32) for each search method."""
    import jax.numpy as jnp

    from bioclip_jax.inference import ann
    from bioclip_jax.inference.topk import DeviceBank

    emb, q = _search_data(rows, queries)
    results, truth = [], None
    for name, dtype in (("exact, float32 bank", jnp.float32), ("exact, bf16 bank", jnp.bfloat16)):
        start = time.perf_counter()
        bank = DeviceBank(emb, dtype=dtype)
        built = time.perf_counter() - start
        bank.top_k(q[:len(q) % bank.batch_size or bank.batch_size], k)  # compiles outside the timing
        start = time.perf_counter()
        found = bank.top_k(q, k)[1]
        rate = len(q) / (time.perf_counter() - start)
        truth = found if truth is None else truth
        results.append((f"{name} (device)", built, rate, ann.recall_at(found, truth, k)))
        del bank
    start = time.perf_counter()
    index = ann.build(emb, ann.default_nlist(rows), progress=False)
    built = time.perf_counter() - start
    for nprobe in (8, 32, 128):
        index.nprobe = nprobe
        start = time.perf_counter()
        found = ann.search(index, q, k)[1]
        rate = len(q) / (time.perf_counter() - start)
        results.append((f"faiss IVF{index.nlist},SQfp16 nprobe {nprobe}", built, rate, ann.recall_at(found, truth, k)))
    start = time.perf_counter()
    found = _numpy_top_k(emb, q, k)
    results.append(("numpy brute force, float32", 0.0, len(q) / (time.perf_counter() - start),
                    ann.recall_at(found, truth, k)))
    return results


def _photo_folder(folder: str, n: int, size: tuple[int, int] = (500, 375)) -> str:
    """`n` JPEGs of a real photo (matplotlib's grace_hopper.jpg), shifted crops at `size` (typical of iNaturalist /
    TreeOfLife images), quality 90."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        x, y = (7 * i) % (photo.width // 4), (11 * i) % (photo.height // 4)
        crop = photo.crop((x, y, x + 3 * photo.width // 4, y + 3 * photo.height // 4)).resize(size)
        crop.save(os.path.join(folder, f"img{i:05d}.jpg"), quality=90)
    return folder


class _Files:
    """open_clip's side: a map-style dataset of (preprocessed image, index), as torchvision's ImageFolder reads."""

    def __init__(self, files: list[str], preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as image:
            return self.preprocess(image.convert("RGB")), i


def _open_clip_embed(model, preprocess, files: list[str], out: str, batch: int) -> None:
    """open_clip's side of `embed`: a DataLoader with 2 worker processes, encode, normalise, the same Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    # spawn: forking a process that runs JAX's threads can deadlock the children.
    loader = torch.utils.data.DataLoader(_Files(files, preprocess), batch_size=batch, num_workers=2,
                                         multiprocessing_context="spawn", persistent_workers=False)
    ids, feats = [], []
    with torch.no_grad():
        for pixels, index in loader:
            feats.append(torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy())
            ids += [files[i] for i in index.tolist()]
    matrix = np.concatenate(feats)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]).cast(pa.list_(pa.float32()))
    pq.write_table(pa.table({"uuid": ids, "emb": emb, "file_name": ids}), out)


def bench_embed(model_name: str, batch: int, images: int, iters: int = 1) -> list[tuple[str, str, float]]:
    """images/s of the whole job on each side: a warm-up batch each, then `iters` runs alternating sides (median)."""
    import tempfile

    import open_clip
    import torch

    import bioclip_jax
    from bioclip_jax.inference.inputs import collect_inputs
    from bioclip_jax.inference.jobs import embed_job

    with tempfile.TemporaryDirectory() as tmp:
        folder = _photo_folder(os.path.join(tmp, "photos"), images)
        warm = _photo_folder(os.path.join(tmp, "warm"), batch)
        ours = bioclip_jax.create_model(model_name)
        theirs, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        theirs.eval()
        torch.manual_seed(0)

        def run(side, src, out):
            if side == "bioclip_jax":
                embed_job(ours, collect_inputs([src]), out, batch_size=batch, preprocess="open_clip", progress=False)
            else:
                _open_clip_embed(theirs, preprocess, sorted(os.path.join(src, f) for f in os.listdir(src)), out,
                                 batch)

        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        for side in SIDES:
            run(side, warm, os.path.join(tmp, f"warm-{side}.parquet"))
        for i in range(iters):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                start = time.perf_counter()
                run(side, folder, os.path.join(tmp, f"{side}-{i}.parquet"))
                seconds[side].append(time.perf_counter() - start)
        return [(f"embed {images} JPEGs", side, images / float(np.median(seconds[side]))) for side in SIDES]


def bench_decode(images: int) -> None:
    """Prints CPU ms per image of one thread (load + preprocess), and the cores each TPU host needs."""
    import tempfile

    from bioclip_jax import hardware
    from bioclip_jax.data.transforms import Preprocess, load_image
    from bioclip_jax.models.config import get_model_config
    from bioclip_jax.train.metrics import forward_flops

    cases = [("500x375 JPEG, open_clip resize + crop", (500, 375), "shortest"),
             ("500x375 JPEG, pybioclip squash", (500, 375), "pybioclip"),
             ("224x224 JPEG (make-shards --resize 224), open_clip", (224, 224), "shortest")]
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size, mode in cases:
            folder = _photo_folder(os.path.join(tmp, f"{size[0]}"), images, size)
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
            preprocess = Preprocess(size=224, resize_mode=mode)
            best = float("inf")
            for _ in range(3):
                start = time.thread_time()
                for f in files:
                    preprocess(load_image(f))
                best = min(best, (time.thread_time() - start) / len(files))
            rates.append(1 / best)
            print(f"{label}: {best * 1e3:.2f} ms CPU / image, {1 / best:.0f} images/s per core")
    print("\n| chip | model | images/s per chip (40% MFU) | chips per host | images/s per host | cores needed: "
          + " / ".join(f"{r:.0f}/s" for r in rates) + " |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("v5e", "v6e", "v5p"):
        chip = hardware.TPUS[name]
        for model in ("ViT-B-16", "ViT-L-14"):
            per_chip = chip.peak_bf16_flops * 0.4 / forward_flops(get_model_config(model))[0]
            host = per_chip * chip.chips_per_host
            print(f"| {name} | {model} | {per_chip:,.0f} | {chip.chips_per_host} | {host:,.0f} | "
                  + " / ".join(f"{host / r:.0f}" for r in rates) + " |")


FINETUNE_LR = {"full": 3e-4, "vision": 3e-4, "lora": 3e-3}  # the demo model trained at 2e-3 (configs/demo.py)


TRAIN_PER_SPECIES, HELDOUT_PER_SPECIES, RETENTION_PER_SPECIES = 16, 16, 10


def _species_csv(path: str, taxa, first_index: int, splits: dict[str, int]) -> str:
    """Fresh drawings (indices from `first_index`, beyond any the demo trained on) of `taxa` as PNGs next to a CSV
    with their ranks, common names and a `split` column: `splits` = {split: images per species}."""
    import csv

    from bioclip_jax.data.synthetic import SyntheticConfig, SyntheticTreeOfLife

    tree = SyntheticTreeOfLife(SyntheticConfig(seed=0, image_size=64))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "kingdom", "phylum", "cls", "order", "family", "genus", "species",
                         "common_name", "split"])
        for taxon in taxa(tree):
            index = first_index
            for split, count in splits.items():
                for _ in range(count):
                    name = f"{taxon.genus}_{taxon.species}_{index:04d}.png"
                    tree.draw(taxon, index).save(os.path.join(folder, name))
                    writer.writerow([name, *taxon.ranks, taxon.common_name, split])
                    index += 1
    return path


def _new_species_csv(folder: str) -> str:
    """The demo tree's held-out species (never trained on): the user's data of the bench, 16 images per species to
    train on and 16 held out (fixed by the CSV's split column: 320 held-out images, not 80, for a steadier number)."""
    return _species_csv(os.path.join(folder, "new_species.csv"), lambda tree: tree.heldout_species, 1000,
                        {"train": TRAIN_PER_SPECIES, "val": HELDOUT_PER_SPECIES})


def _retention_shards(folder: str) -> str:
    """New drawings of the 180 species the demo trained on, 10 each (1,800 images; the demo's own val split has 2
    each), as shards with ranks: the retention set."""
    from bioclip_jax.shards import make_shards
    from bioclip_jax.shards.folder import LabelledSource, read_labelled_images

    shards = os.path.join(folder, "shards")
    if not os.path.exists(os.path.join(shards, "summary.json")):  # written last: a finished set
        csv_path = _species_csv(os.path.join(folder, "retention.csv"), lambda tree: tree.seen_species, 2000,
                                {"val": RETENTION_PER_SPECIES})
        make_shards(LabelledSource({"val": read_labelled_images(csv_path).rows}), shards, progress=False)
    return os.path.join(shards, "val")


# (row name, method, Options fields): each method with the defaults (replay of the demo's own training shards, as
# many rows as the batch's own; the fine-tuned weights exported as they are), then full fine-tuning without replay,
# WiSE-FT's half mix (the default without replay) and the plain fine-tuned weights
FINETUNE_RUNS = [("probe", "probe", {}), ("full", "full", {"replay": True}), ("LoRA", "lora", {"replay": True}),
                 ("vision only", "vision", {"replay": True}), ("full, no replay", "full", {}),
                 ("full, no replay, WiSE-FT off", "full", {"wise_alpha": 1.0})]


def bench_finetune(out: str, base: str | None) -> list[tuple[str, dict, float]]:
    """[(row, results.json, seconds)] for the probe and each fine-tune of FINETUNE_RUNS, from the demo model."""
    import json

    from bioclip_jax.train.config import load_config
    from bioclip_jax.train.finetune import Options, finetune

    if base is None:
        base = os.path.join(out, "demo", "open_clip")
        if not os.path.exists(base):
            from bioclip_jax.demo import run_demo

            run_demo(load_config("demo"), os.path.join(out, "demo"))
    data = _new_species_csv(os.path.join(out, "new_species"))
    retention = _retention_shards(os.path.join(out, "retention"))
    replay = os.path.join(os.path.dirname(base), "data", "train")  # the 180 species the demo trained on
    rows = []
    for name, method, fields in FINETUNE_RUNS:
        folder = os.path.join(out, name.replace(", ", "_").replace(" ", "_"))
        if not os.path.exists(os.path.join(folder, "results.json")):
            start = time.perf_counter()
            fields = {**fields, "replay": replay if fields.get("replay") else None}
            finetune(data, folder, Options(start=base, method=method, lr=FINETUNE_LR.get(method, 0.0),
                                           templates="single", retention=retention, **fields), progress=False)
            with open(os.path.join(folder, "seconds.txt"), "w") as f:
                f.write(f"{time.perf_counter() - start:.1f}")
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        if results["heldout_images"] != 20 * HELDOUT_PER_SPECIES or results["before"]["retention"]["images"] != \
                180 * RETENTION_PER_SPECIES:
            raise SystemExit(f"{folder}: a row of another version of this bench (other held-out or retention sets); "
                             "pass a new --out")
        with open(os.path.join(folder, "seconds.txt")) as f:
            rows.append((name, results, float(f.read())))
    return rows


def print_finetune(rows: list[tuple[str, dict, float]]) -> None:
    first = rows[0][1]
    retention = first["before"]["retention"]
    print(f"# finetune: demo model -> {len(first['classes'])} new species "
          f"({first['run']['train_images']} train / {first['heldout_images']} held-out images); retention: "
          f"{retention['images']} images of {retention['species']} trained species; CPU "
          f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}")
    print("| method | held-out top-1 | mean per-class top-1 | retention top-1 | steps | lr | WiSE alpha | replay rows "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    before = first["before"]
    print(f"| zero-shot | {100 * before['heldout']['top1']:.1f}% | "
          f"{100 * before['heldout']['mean_per_class_top1']:.1f}% | {100 * before['retention']['top1']:.1f}% | "
          "- | - | - | - | - |")
    for name, r, seconds in rows:
        after, run = r["after"], r["run"]
        held = after["heldout"]
        print(f"| {name} | {100 * held['top1']:.1f}% | {100 * held['mean_per_class_top1']:.1f}%"
              f" | {100 * after['retention']['top1']:.1f}% | {run.get('steps', '-')} | {run.get('lr', '-')} | "
              f"{run.get('wise_alpha', '-')} | {run.get('replay_per_batch') or '-'} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["encode", "pipeline", "train", "gpu", "gpu-side", "cli", "search", "embed",
                                         "decode", "finetune"])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # gpu-side: one side's runs, as JSON
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--images", type=int, default=128, help="embed / decode: JPEGs in the folder")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute precision (bfloat16: bf16 compute for bioclip_jax, AMP bf16 for open_clip)")
    parser.add_argument("--attn", choices=["xla", "cudnn"], default="xla", help="bioclip_jax attention")
    parser.add_argument("--remat", default="", help="bioclip_jax remat policy for train (full, dots, dots_all)")
    parser.add_argument("--torch-grad-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="gpu mode: where to write the table (gpu_bench.md); finetune: "
                                                    "the runs' folder (runs/bench_finetune)")
    parser.add_argument("--base", help="finetune: the start model (default: train the demo recipe first)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="search: index rows")
    parser.add_argument("--queries", type=int, default=500, help="search: queries")
    parser.add_argument("--default-allocator", action="store_true",
                        help="skip the host-allocator setting bioclip-jax's CLI makes on CPU (bioclip_jax.runtime)")
    args = parser.parse_args()
    from bioclip_jax import runtime

    runtime.quiet_libtpu()  # before JAX starts: no libtpu worker-hostname error off a TPU VM, as in the CLI
    if args.mode == "cli":
        rows = bench_cli(args.iters)
        print(f"# cli: median wall time of {args.iters} runs, {platform.processor() or 'cpu'}, {os.cpu_count()} "
              f"cores, {time.strftime('%Y-%m-%d')}")
        print(f"| {'command':<36} | {'wall s':>7} | {'over python':>11} |")
        print(f"|{'-' * 38}|{'-' * 9}|{'-' * 13}|")
        for name, seconds in rows:
            print(f"| {name:<36} | {seconds:>7.3f} | {seconds - rows[0][1]:>+11.3f} |")
        return

    if not args.default_allocator:
        from bioclip_jax.runtime import tune_for_cpu

        tune_for_cpu()  # as bioclip-jax's CLI does; it applies to open_clip in this process too

    if args.mode == "decode":
        bench_decode(args.images)
        return

    import jax

    if args.mode == "search":
        rows = bench_search(args.rows, args.queries)
        print(f"# search: {args.rows:,} x 768 synthetic embeddings (float16, clustered), {args.queries} queries, "
              f"top 10, {jax.devices()[0].platform} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores), "
              f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
        print(f"| {'method':<38} | {'build s':>8} | {'queries/s':>10} | {'recall@10':>9} |")
        print(f"|{'-' * 40}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
        for name, built, rate, recall in rows:
            print(f"| {name:<38} | {built:>8.1f} | {rate:>10.1f} | {recall:>9.3f} |")
        return

    import torch

    if args.mode == "finetune":
        print_finetune(bench_finetune(args.out or "runs/bench_finetune", args.base))
        return
    if args.mode == "gpu":
        bench_gpu(args.iters, args.out or "gpu_bench.md", args.model)
        return
    if args.mode == "gpu-side":
        import json

        print(json.dumps(bench_gpu_side(args.side, args.iters, args.model)))
        return
    if args.mode == "encode":
        rows = bench_encode(args.model, args.batch, args.iters, args.dtype, args.attn)
        what = f"{args.model}, batch {args.batch}, {args.dtype}"
    elif args.mode == "train":
        rows = bench_train(args.model, args.batch, args.iters, args.dtype, args.attn, args.remat,
                           args.torch_grad_checkpointing)
        what = f"{args.model}, batch {args.batch}, {args.dtype}, AdamW"
    elif args.mode == "embed":
        rows = bench_embed(args.model, args.batch, args.images, args.iters)
        what = f"{args.model} random weights, batch {args.batch}, fp32, 500x375 JPEGs -> Parquet"
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
