"""Pre-flight planner: compiles the trainer's own step for a TPU slice (or fake CPU devices) without the hardware and
reports per-chip memory against HBM, XLA's FLOPs against the analytic count, and the collectives in the compiled HLO.

TPU slices compile deviceless through libtpu (`pip install 'bioclip_jax[tpu-plan]'`): `get_topology_desc` gives
abstract devices, the step is lowered on ShapeDtypeStructs that carry the trainer's shardings, and an over-HBM
program fails to compile with RESOURCE_EXHAUSTED, which is the "does not fit" answer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from bioclip_jax import hardware, runtime
from bioclip_jax import mesh as mesh_lib
from bioclip_jax.convert.files import load_model_config
from bioclip_jax.errors import InputError, first_line
from bioclip_jax.models.clip import init_params
from bioclip_jax.train import metrics as metrics_lib
from bioclip_jax.train.trainer import build_train_step, device_batch_size

GIB = hardware.GIB
# XLA's exec_time_optimization_effort for `plan --quick` (-1 to 1, default 0): the TPU compiler then skips its
# speed optimisations (collective/compute overlap, prefetch scheduling), which are most of its compile time.
QUICK_EFFORT = -1.0
# The utilisation the time estimate assumes, of the FLOPs the chips execute (remat's recomputation included):
# MaxText reports 40-60% for dense transformer training on TPU; CLIP's contrastive loss and a short sequence
# (257 tokens) sit at the low end. `--mfu` changes it.
DEFAULT_MFU = 0.4
# FLOPs executed per analytic FLOP (3x forward) by remat policy: "full" recomputes the whole forward in the
# backward (4x forward); the dots policies keep every matmul output and recompute only elementwise work.
REMAT_RECOMPUTE = {"": 1.0, "dots": 1.0, "dots_all": 1.0, "full": 4 / 3}
# Training-split sizes of the datasets the recipes name (a folder name in data.train -> images), for the steps of an
# epochs-based recipe when its shards are not on this machine: TreeOfLife-10M's training split as BioCLIP's
# recipe counts it (configs/bioclip_vitb16.py), TreeOfLife-200M's 214M images (the BioCLIP 2 paper).
PUBLISHED_SPLITS = {"treeoflife-10m": 9_900_000, "treeoflife-200m": 214_000_000}


@dataclasses.dataclass(frozen=True)
class Topology:
    platform: str  # "tpu" or "cpu"
    name: str  # JAX topology name ("v5e:16x16") or "cpu:N"
    chips: int
    generation: str = ""  # "v4", "v5e", "v5p", "v6e" (hardware.TPUS); "" for cpu

    @property
    def chip(self) -> hardware.Accelerator | None:
        return hardware.TPUS.get(self.generation)


def _cloud_shape(chip: hardware.Accelerator, chips: int) -> str:
    """Chip count -> the slice shape Cloud TPU builds for it (v5e/v6e: 2x2, 2x4, 4x4 ... 16x16; v4/v5p: 2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8 ...: doubling the last of the smallest dimensions)."""
    if chips & (chips - 1):
        raise InputError(f"{chip.name} slices of {chips} chips have no standard shape; give the JAX topology "
                         f"name instead, e.g. {chip.name}:{'2x2x3' if chip.topology_dims == 3 else '4x6'}")
    if chip.topology_dims == 2:
        k = chips.bit_length() - 1
        return f"{2 ** (k // 2)}x{2 ** (k - k // 2)}"
    if chips < 4:
        raise InputError(f"the smallest {chip.name} slice has 4 chips ({chip.name}-8); got {chips} chips")
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, d in enumerate(shape) if d == smallest)] *= 2
    return "x".join(map(str, shape))


def parse_topology(name: str) -> Topology:
    """Cloud names (`v5litepod-256`, `v5e-256`, `v4-32`, `v5p-128`, `v6e-64`: v4/v5p count TensorCores, two per
    chip), JAX names (`v5e:16x16`, `v4:2x2x1`) or `cpu:N` (N fake CPU devices, a dry run of the shardings). The
    generations are those of `hardware.TPUS`."""
    text = name.strip().lower()
    known = "a Cloud name (v5litepod-256, v5e-256, v4-32, v5p-128, v6e-64), a JAX name (v5e:16x16, v4:2x2x1) or cpu:N"
    if m := re.fullmatch(r"cpu:(\d+)", text):
        if int(m[1]) < 1:
            raise InputError(f"topology {name!r}: cpu:N needs N >= 1")
        return Topology("cpu", text, int(m[1]))
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text) or re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if not m:
        raise InputError(f"unknown topology {name!r}; expected {known}")
    chip = hardware.tpu(m[1])
    if chip is None:
        raise InputError(f"topology {name!r}: unknown TPU generation {m[1]!r}; expected {known}")
    if "-" in text:
        cores = int(m[2])
        if cores < 1 or cores % chip.cores_per_chip:
            raise InputError(f"topology {name!r}: {chip.name} Cloud names count TensorCores ({chip.cores_per_chip} "
                             f"per chip); {cores} is not a multiple of {chip.cores_per_chip}")
        chips = cores // chip.cores_per_chip
        return Topology("tpu", f"{chip.name}:{_cloud_shape(chip, chips)}", chips, chip.name)
    dims = [int(d) for d in m[2].split("x")]
    if len(dims) != chip.topology_dims or min(dims) < 1:
        example = "2x2x1" if chip.topology_dims == 3 else "2x2"
        raise InputError(f"topology {name!r}: {chip.name} shapes have {chip.topology_dims} dimensions, "
                         f"e.g. {chip.name}:{example}")
    return Topology("tpu", f"{chip.name}:{m[2]}", math.prod(dims), chip.name)


def topology_devices(topology: Topology) -> list:
    """Abstract TPU devices (no TPU needed, libtpu must be installed), or the first N CPU devices."""
    if topology.platform == "cpu":
        try:  # only possible before JAX's backend starts; the CLI calls this first thing
            jax.config.update("jax_num_cpu_devices", topology.chips)
        except RuntimeError:
            pass
        devices = jax.devices("cpu")
        if len(devices) < topology.chips:
            raise InputError(f"topology {topology.name}: JAX already started with {len(devices)} CPU devices; "
                             f"run the planner in a fresh process (bioclip-jax plan) for {topology.chips}")
        return devices[:topology.chips]
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise InputError(f"compiling for {topology.name} needs libtpu: pip install 'bioclip_jax[tpu-plan]' "
                          f"(or \"jax[tpu]=={jax.__version__}\")")
    from jax.experimental import topologies

    # libtpu lets one process per host load it unless told otherwise (read when the TPU plugin loads).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    runtime.quiet_libtpu()
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                            chip_config_name=topology.chip.chip_config)
    except Exception as e:  # noqa: BLE001 - libtpu rejects a shape with a generic runtime error
        raise InputError(f"topology {topology.name}: libtpu cannot build it ({first_line(e)})") from None
    return list(desc.devices)


@dataclasses.dataclass
class Plan:
    topology: Topology
    device_kind: str
    per_chip_batch: int
    global_batch: int
    hbm_gib: float
    fits: bool
    compile_s: float
    memory: dict  # bytes per chip: arguments, outputs, aliased, temporaries, total
    exceeded: str = ""  # XLA's RESOURCE_EXHAUSTED message when it does not fit
    xla_flops: float = 0.0  # per step, all chips
    analytic_flops: float = 0.0  # per step: train_flops_per_pair x global batch (no remat recompute)
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> {"ops", "instructions", "in_loops"}
    quick: bool = False  # compiled at QUICK_EFFORT instead of the effort train compiles at
    hlo: str = dataclasses.field(default="", repr=False)  # the compiled, scheduled HLO module
    xla_bytes: float = 0.0  # XLA's bytes accessed per step, per chip (a scanned layer counted once, as its FLOPs)
    remat: str = ""  # the config's remat policy (REMAT_RECOMPUTE)
    steps: int = 0  # the run's optimizer steps; 0 when unknown
    steps_note: str = ""  # where `steps` comes from
    mfu: float = DEFAULT_MFU
    accum_steps: int = 1

    @property
    def recompute(self) -> float:
        """FLOPs executed per analytic FLOP: REMAT_RECOMPUTE, plus one more forward (1/3) for gradient accumulation's
        feature cache (train.accum_steps > 1: every micro-batch's features first without gradients)."""
        return REMAT_RECOMPUTE.get(self.remat, 1.0) + (1 / 3 if self.accum_steps > 1 else 0.0)

    @property
    def step_s(self) -> float:
        """Estimated seconds per step: the FLOPs the chips execute (analytic x REMAT_RECOMPUTE) at `mfu` of the
        chip's bf16 peak, or the HBM traffic at full bandwidth when that is longer (XLA's bytes per FLOP, from its
        cost analysis of the compiled step, times the executed FLOPs). 0 when the chip is unknown."""
        chip = self.topology.chip
        if chip is None or not self.fits:
            return 0.0
        executed = self.analytic_flops * self.recompute / self.topology.chips
        compute = executed / (chip.peak_bf16_flops * self.mfu)
        chip_flops = self.xla_flops / self.topology.chips
        memory = executed * self.xla_bytes / chip_flops / chip.hbm_bytes_per_s if chip_flops and self.xla_bytes else 0
        return max(compute, memory)

    @property
    def hours(self) -> float:
        return self.steps * self.step_s / 3600

    @property
    def chip_hours(self) -> float:
        return self.hours * self.topology.chips

    @property
    def per_chip_gib(self) -> float:
        return self.memory.get("total", 0) / GIB

    def line(self) -> str:
        return (f"plan: fits={'yes' if self.fits else 'no'} chips={self.topology.chips} "
                f"per_chip_batch={self.per_chip_batch} per_chip_gib={self.per_chip_gib:.2f} "
                f"hbm_gib={self.hbm_gib:g} compile_s={self.compile_s:.1f}")


_LINE = re.compile(r"^plan: fits=(yes|no) .*per_chip_gib=([\d.]+) .*compile_s=([\d.]+)$", re.M)


def read_line(output: str) -> tuple[bool, float, float] | None:
    """(fits, GiB per chip, compile seconds) from `bioclip-jax plan`'s output (its `Plan.line`), None without one."""
    match = _LINE.search(output)
    return (match[1] == "yes", float(match[2]), float(match[3])) if match else None


_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast|ragged-all-to-all)(-start)?\(")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# One callee (`body=%b`) or a braced list (`branch_computations={%a, %b}`): a comma outside braces ends the callee
# (`condition=%c, body=%b` names two).
_CALLS = re.compile(r"(?:body|condition|to_apply|calls|branch_computations|true_computation|"
                    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives of a compiled (scheduled) HLO module by kind: `ops` that execute (one per channel id and result
    shape) and the `instructions` that spell them, plus `in_loops`, the ops inside a while loop's body (run once
    per iteration).

    The TPU compiler overlaps a collective with compute by splitting it over many fusions ("async collective fusion"):
    one all-gather then shows up as dozens of `all-gather` instructions that share a channel id and run as one
    transfer. A reduce-scatter shows up as an `all-reduce` fused with the `dynamic-slice` that keeps this chip's
    shard (a computation named all-reduce-scatter): it is counted as the reduce-scatter it executes as."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            current = m[2]
            computations[current] = []
            if m[1]:
                entry = current
        elif current is not None:
            computations[current].append(line)
    in_loop: set[str] = set()

    def mark(name: str, looped: bool, seen: set) -> None:
        if (name, looped) in seen or name not in computations:
            return
        seen.add((name, looped))
        if looped:
            in_loop.add(name)
        for line in computations[name]:
            for m in _CALLS.finditer(line):
                for callee in re.split(r"[{},\s%]+", m[1]):
                    if callee:
                        mark(callee, looped or " while(" in line, seen)

    if entry is not None:
        mark(entry, False, set())
    ops: dict[str, set] = collections.defaultdict(set)
    looped_ops: dict[str, set] = collections.defaultdict(set)
    instructions: collections.Counter = collections.Counter()
    for name, lines in computations.items():
        scatters = name.startswith("all-reduce-scatter") or any(
            line.lstrip().startswith("ROOT") and " dynamic-slice(" in line for line in lines)
        for i, line in enumerate(lines):
            if not (m := _COLLECTIVE.search(line)):
                continue
            kind = "reduce-scatter" if m[1] == "all-reduce" and scatters else m[1]
            channel = re.search(r"channel_id=(\d+)", line)
            # Result shape without layout: the pieces of one split collective share it (and the channel id).
            shape = re.sub(r"\{[^}]*\}", "", line.split("=", 1)[1].split(m[1])[0]).strip()
            key = (channel[1], shape) if channel else (name, i)
            instructions[kind] += 1
            ops[kind].add(key)
            if name in in_loop:
                looped_ops[kind].add(key)
    return {kind: {"ops": len(ops[kind]), "instructions": instructions[kind], "in_loops": len(looped_ops[kind])}
            for kind in sorted(ops)}


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _exceeded_bytes(message: str) -> tuple[float, str]:
    """(bytes XLA needed per chip, one-line reason) from its RESOURCE_EXHAUSTED compile error, which says either
    "Used 16.03G of 15.75G hbm. Exceeded hbm capacity by 35.00M." or "the total memory required for HLO temporaries
    (24.38G) exceeds available HBM (15.75G)" (a lower bound: arguments come on top)."""
    line = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message[:300])
    reason = line[line.find("RESOURCE_EXHAUSTED"):].strip()
    units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    m = re.search(r"Used ([\d.]+)([KMGT]?)\s*of", message) or re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)",
                                                                        message)
    return (float(m[1]) * units[m[2]] if m else 0.0), reason


def run_steps(config: ml_collections.ConfigDict, examples: int = 0) -> tuple[int, str]:
    """(optimizer steps of the whole run, where the count comes from), as the trainer counts them: train.steps, or
    train.epochs over the training split (global_batch_size rows of it per step; replay rows come on top). The split's
    size: `examples` if given, else its shards when they are on this machine, else PUBLISHED_SPLITS. (0, why) when
    none of these says."""
    t = config.train
    if t.epochs <= 0:
        return (t.steps, "train.steps") if t.steps > 0 else (0, "train.steps is 0")
    source = f"--examples {examples:,}"
    if not examples and config.data.train and os.path.exists(config.data.train):
        from bioclip_jax.data import pipeline

        examples, source = len(pipeline.open_source(config.data.train)), f"{config.data.train}'s shards"
    if not examples:
        name = next((n for n in PUBLISHED_SPLITS if n in config.data.train.lower()), None)
        if name is None:
            return 0, f"{t.epochs:g} epochs of {config.data.train or 'an unnamed split'}: give --examples N"
        examples, source = PUBLISHED_SPLITS[name], f"{name} as published, about"
    steps = max(1, int(t.epochs * examples // t.global_batch_size))
    return steps, f"{t.epochs:g} epochs x {examples:,} images / {t.global_batch_size:,} ({source})"


def plan(config: ml_collections.ConfigDict, topology: str | Topology, quick: bool = False,
         mfu: float = DEFAULT_MFU, examples: int = 0) -> Plan:
    """Compiles `config`'s training step (the trainer's own, through build_train_step) for `topology`. `quick`
    compiles with XLA's exec-time optimisation effort at QUICK_EFFORT: much faster, and the memory is what the step
    needs without XLA's speed optimisations, at or under the full compile's (docs/tpu.md has both measured). `mfu`
    and `examples` go into the time estimate (Plan.step_s, run_steps)."""
    if not 0 < mfu <= 1:
        raise InputError(f"mfu={mfu}: expected a fraction of the chip's peak in (0, 1], e.g. {DEFAULT_MFU}")
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topology)
    mesh = mesh_lib.make_mesh(devices)
    rows = device_batch_size(config)
    model_config = load_model_config(config.model)
    image_size, context = model_config.vision.image_size, model_config.text.context_length
    # Random-init shapes (stacked when scan_layers): the planner never reads config.init's weights (same shapes).
    parts = build_train_step(config, model_config, mesh, lambda: init_params(model_config,
                                                                             scan_layers=config.scan_layers))
    batch = {"image": jax.ShapeDtypeStruct((rows, image_size, image_size, 3), jnp.uint8),
             "tokens": jax.ShapeDtypeStruct((rows, context), jnp.int32)}
    abstract_batch = _abstract(batch, {k: parts.batch_sharding for k in batch})
    abstract_state = _abstract(parts.abstract_state, parts.state_sharding)

    kind = devices[0].device_kind
    hbm = topology.chip.hbm_gib if topology.chip else round(_host_memory_bytes() / topology.chips / GIB, 2)
    steps, steps_note = run_steps(config, examples)
    result = Plan(topology, kind, rows // topology.chips, rows, hbm, True, 0.0, {},
                  analytic_flops=metrics_lib.train_flops_per_pair(model_config) * rows, quick=quick,
                  remat=config.remat or "", steps=steps, steps_note=steps_note, mfu=mfu,
                  accum_steps=config.train.accum_steps)
    lowered = parts.step.lower(abstract_state, abstract_batch)
    default_effort = jax.config.jax_exec_time_optimization_effort
    default_cache = jax.config.jax_enable_compilation_cache
    start = time.perf_counter()
    try:
        jax.config.update("jax_exec_time_optimization_effort", QUICK_EFFORT if quick else default_effort)
        # The plan reports the compile time and what the compiler allocates: a persistent-cache hit would skip both.
        jax.config.update("jax_enable_compilation_cache", False)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        result.compile_s = time.perf_counter() - start
        used, result.exceeded = _exceeded_bytes(str(e))
        result.fits, result.memory = False, {"total": used}
        return result
    finally:
        jax.config.update("jax_exec_time_optimization_effort", default_effort)
        jax.config.update("jax_enable_compilation_cache", default_cache)
    result.compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    result.memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                     "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
                     "code": m.generated_code_size_in_bytes}
    result.memory["total"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                              + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    result.fits = result.memory["total"] <= hbm * GIB
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.xla_flops = float((cost or {}).get("flops", 0.0)) * topology.chips  # the cost is per chip (SPMD)
    result.xla_bytes = float((cost or {}).get("bytes accessed", 0.0))
    result.hlo = compiled.as_text()
    result.collectives = count_collectives(result.hlo)
    return result


def _host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _flops(value: float) -> str:
    return f"{value / 1e12:.1f} TFLOP" if value >= 1e12 else f"{value / 1e9:.2f} GFLOP"


def report(result: Plan) -> str:
    """The human-readable plan, ending with the one machine-readable `plan:` line."""
    r, gib = result, (lambda b: f"{b / GIB:.2f} GiB")
    lines = [f"topology     {r.topology.name} ({r.device_kind}): {r.topology.chips} chips, "
             f"{r.hbm_gib:g} GiB {'HBM' if r.topology.chip else 'host memory share'} each",
             f"batch        {r.per_chip_batch} pairs per chip, {r.global_batch} global"]
    if r.fits or r.memory.keys() - {"total"}:
        lines.append(f"memory/chip  arguments {gib(r.memory['arguments'])}, temporaries {gib(r.memory['temporaries'])}"
                     f", outputs not aliased {gib(r.memory['outputs'] - r.memory['aliased'])}, code "
                     f"{gib(r.memory['code'])}: total {gib(r.memory['total'])} of {r.hbm_gib:g} GiB")
    else:
        lines.append(f"memory/chip  does not fit: {r.exceeded}")
    lines.append(f"fits         {'yes' if r.fits else 'no'}")
    lines.append(f"compile      {r.compile_s:.1f} s" + (
        f" (--quick: XLA's exec-time optimisation effort {QUICK_EFFORT:g}, so the memory is without XLA's speed "
        "optimisations; near the HBM limit, plan again without --quick)" if r.quick else ""))
    if r.xla_flops and " while(" in r.hlo:  # XLA's cost analysis counts a loop body once, not once per iteration
        lines.append(f"flops/step   XLA {_flops(r.xla_flops)} (each scanned layer counted once; "
                     f"--config.scan_layers=False for XLA's full count), analytic {_flops(r.analytic_flops)}")
    elif r.xla_flops:
        lines.append(f"flops/step   XLA {_flops(r.xla_flops)}, analytic {_flops(r.analytic_flops)} (x"
                     f"{r.xla_flops / r.analytic_flops:.2f}: XLA also counts remat recomputation, the loss and the "
                     f"optimizer)")
        peak = metrics_lib.peak_flops(r.device_kind)
        if peak:
            lines.append(f"             at 100% MFU: {r.analytic_flops / (peak * r.topology.chips) * 1e3:.1f} ms "
                         f"per step ({peak / 1e12:g} TFLOP/s per chip)")
    lines += _time_lines(r)
    if r.collectives:
        for kind, c in r.collectives.items():
            lines.append(f"collective   {kind}: {c['ops']} executed ({c['instructions']} HLO instructions"
                         + (f"; {c['in_loops']} inside loops, run per iteration)" if c["in_loops"] else ")"))
    elif r.fits:
        lines.append("collectives  none")
    lines.append(r.line())
    return "\n".join(lines)


def _time_lines(r: Plan) -> list[str]:
    if not r.step_s:
        return []
    chip = r.topology.chip
    accum = f", accum_steps {r.accum_steps}" if r.accum_steps > 1 else ""
    lines = [f"time/step    ~{r.step_s:.2f} s at {r.mfu:.0%} utilisation of the FLOPs executed (analytic x "
             f"{r.recompute:.2f} for remat {r.remat or 'off'}{accum}) at {chip.peak_bf16_flops / 1e12:g} TFLOP/s "
             "per chip"]
    if r.xla_bytes and r.xla_flops:
        intensity = r.xla_flops / r.topology.chips / r.xla_bytes
        ridge = chip.peak_bf16_flops / chip.hbm_bytes_per_s
        lines.append(f"             XLA's cost analysis: {intensity:.0f} FLOP per HBM byte, the chip's ridge "
                     f"{ridge:.0f}: {'compute' if intensity >= ridge * r.mfu else 'memory'}-bound")
    if r.steps:
        lines.append(f"run          {r.steps:,} steps ({r.steps_note}): {r.hours:,.1f} h, "
                     f"{r.chip_hours:,.0f} chip-hours")
    else:
        lines.append(f"run          steps unknown ({r.steps_note})")
    return lines


def slice_sizes(generation: str, rows: int) -> list[int]:
    """Chip counts of the standard slices of a generation (powers of two from 4: the shapes `_cloud_shape` builds)
    that divide a global batch of `rows`."""
    chip = hardware.tpu(generation)
    if chip is None:
        raise InputError(f"unknown TPU generation {generation!r}; expected one of {', '.join(hardware.TPUS)}")
    largest = 256 if chip.topology_dims == 2 else 4096  # a v5e / v6e pod; v4 / v5p: a large slice of the pod
    return [n for n in (2 ** k for k in range(2, largest.bit_length())) if rows % n == 0]


def search(config: ml_collections.ConfigDict, generation: str, quick: bool = True, mfu: float = DEFAULT_MFU,
           examples: int = 0, remats: tuple[str, ...] = ("full", "dots"), progress=None) -> list[Plan]:
    """For each remat policy (most recomputation first), the smallest slice of `generation` that fits `config`,
    found by bisection over the standard slice sizes (fewer chips, more rows per chip: more memory). Returns the
    fitting plans, one per policy that fits some slice: the first has the fewest chips; at a fixed utilisation a
    run's chip-hours depend on the recomputation, not the slice, so less recomputation on a larger slice can be the
    cheaper run (`cheapest`). `progress(plan)` sees every compile."""
    sizes = slice_sizes(generation, device_batch_size(config))
    found, low = [], 0
    for remat in remats:
        trial = config.copy_and_resolve_references()
        trial.remat = remat
        lo, hi, best = low, len(sizes) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            chip = hardware.tpu(generation)
            topology = parse_topology(f"{chip.name}-{sizes[mid] * chip.cores_per_chip}")
            result = plan(trial, topology, quick=quick, mfu=mfu, examples=examples)
            if progress:
                progress(result)
            if result.fits:
                best, hi = result, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            found.append(best)
            low = sizes.index(best.topology.chips)  # less recomputation needs at least as many chips
    return found


def cheapest(found: list[Plan]) -> Plan | None:
    """The fitting plan with the fewest chip-hours (fewest chips on a tie); None without an estimate."""
    timed = [p for p in found if p.chip_hours]
    return min(timed, key=lambda p: (p.chip_hours, p.topology.chips)) if timed else None


def search_report(config: ml_collections.ConfigDict, generation: str, found: list[Plan]) -> str:
    """One line per remat policy that fits, then the smallest slice and the cheapest run."""
    rows = device_batch_size(config)
    lines = [f"search       {generation}, {rows:,} pairs per step: the smallest slice per remat policy"]
    for p in found:
        lines.append(f"  remat {p.remat or 'off':5s} {p.topology.name} ({p.topology.chips} chips): "
                     f"{p.per_chip_gib:.2f} GiB/chip of {p.hbm_gib:g}, compile {p.compile_s:.0f} s, "
                     f"~{p.step_s:.2f} s/step, {p.hours:,.1f} h, {p.chip_hours:,.0f} chip-hours")
    if not found:
        lines.append("  no standard slice fits: lower the batch or change the recipe")
        return "\n".join(lines)
    best = cheapest(found)
    first = found[0]
    lines.append(f"smallest     {first.topology.name}, {first.topology.chips} chips (remat {first.remat or 'off'})")
    if best:
        lines.append(f"cheapest     {best.topology.name}, {best.topology.chips} chips (remat {best.remat or 'off'}): "
                     f"{best.chip_hours:,.0f} chip-hours at {best.mfu:.0%} utilisation")
    return "\n".join(lines)
