#!/usr/bin/env python
"""Per-chip memory of the sharded encoder (bioclip_jax/inference/encoder.py) on a TPU slice, compiled without a TPU
(deviceless through libtpu: `pip install -e '.[tpu-plan]'`), as `bioclip-jax plan` does for the training step.

    python tools/plan_encoder.py                                   # ViT-L-14 images, v6e-64 and v5e-256, 1,024/chip
    python tools/plan_encoder.py --topology v5e-256 --per-chip 256 1024 4096 --fsdp --tower text --quick

Each cell compiles the encoder's own jitted function (`encode_fn`: params gathered where used, the batch sharded
over every chip) on ShapeDtypeStructs carrying the mesh's shardings, and prints XLA's memory analysis per chip, XLA's
FLOPs per image and the compile time. An encoder that does not fit fails to compile with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bioclip_jax import hardware
from bioclip_jax import mesh as mesh_lib
from bioclip_jax.inference.encoder import encode_fn, encoder_module
from bioclip_jax.models.clip import init_params
from bioclip_jax.models.config import get_model_config
from bioclip_jax.train.plan import QUICK_EFFORT, parse_topology, topology_devices

GIB = hardware.GIB


def plan_encoder(model: str, topology: str, per_chip: int, tower: str = "image", fsdp: bool = False,
                 dtype: str = "bfloat16", quick: bool = False) -> dict:
    """{"topology", "per_chip", "fits", "gib" (per chip), "memory" (bytes by kind), "gflop_per_item", "compile_s"}."""
    topo = parse_topology(topology)
    mesh = mesh_lib.make_mesh(topology_devices(topo))
    config = get_model_config(model)
    module = encoder_module(config, mesh, scan_layers=False, dtype=getattr(jnp, dtype))
    abstract = jax.eval_shape(lambda: init_params(config))
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                    mesh_lib.tree_shardings(abstract, mesh, fsdp))
    rows = per_chip * topo.chips
    size = config.vision.image_size
    shape, kind = ((rows, size, size, 3), jnp.float32) if tower == "image" else ((rows, config.text.context_length),
                                                                                  jnp.int32)
    batch = jax.ShapeDtypeStruct(shape, kind, sharding=mesh_lib.batch_sharding(mesh))
    fn = encode_fn(module, mesh, "encode_image" if tower == "image" else "encode_text", mesh_lib.batch_sharding(mesh))
    out = {"topology": topo.name, "per_chip": per_chip, "tower": tower, "fsdp": fsdp, "hbm_gib": topo.chip.hbm_gib}
    effort = jax.config.jax_exec_time_optimization_effort
    start = time.perf_counter()
    try:
        jax.config.update("jax_exec_time_optimization_effort", QUICK_EFFORT if quick else effort)
        compiled = fn.lower(params, batch).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**out, "fits": False, "gib": float("nan"), "compile_s": time.perf_counter() - start,
                "gflop_per_item": float("nan")}
    finally:
        jax.config.update("jax_exec_time_optimization_effort", effort)
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {**out, "fits": total <= topo.chip.hbm_gib * GIB, "gib": total / GIB,
            "memory": {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
                       "outputs": m.output_size_in_bytes},
            "gflop_per_item": float((cost or {}).get("flops", 0.0)) / per_chip / 1e9,
            "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--topology", nargs="+", default=["v6e-64", "v5e-256"])
    parser.add_argument("--per-chip", nargs="+", type=int, default=[1024])
    parser.add_argument("--tower", choices=["image", "text"], default="image")
    parser.add_argument("--fsdp", action="store_true", help="params FSDP-sharded, as training keeps them")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help=f"XLA exec-time effort {QUICK_EFFORT:g} (faster)")
    args = parser.parse_args()
    print(f"{args.model} {args.tower} tower, {args.dtype} compute, params {'FSDP' if args.fsdp else 'replicated'}")
    print("| topology | per chip | global batch | fits | GiB/chip (args / temps) | HBM | GFLOP/item | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for topology in args.topology:
        for per_chip in args.per_chip:
            r = plan_encoder(args.model, topology, per_chip, args.tower, args.fsdp, args.dtype, args.quick)
            chips = r["topology"]
            parts = (f"{r['gib']:.2f} ({r['memory']['arguments'] / GIB:.2f} / {r['memory']['temporaries'] / GIB:.2f})"
                     if r["fits"] or "memory" in r else "over HBM")
            print(f"| {chips} | {per_chip:,} | {per_chip * parse_topology(topology).chips:,} | "
                  f"{'yes' if r['fits'] else 'no'} | {parts} | {r['hbm_gib']:g} | {r['gflop_per_item']:.1f} | "
                  f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
