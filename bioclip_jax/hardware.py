"""The accelerators the package knows, in one table: how JAX names each (`device_kind`), how Cloud TPU and JAX name
its slices, its dense bf16 peak (MFU), HBM (the planner's fit limit) and its bandwidth, chips per host, and the
ViT-B/16 training images/s one chip consumes (how many input workers a host needs). metrics, the planner and the
input pipeline read it.

Pure data, no imports from the package: every layer may read it (MaxText's `accelerator_to_spec_map` is the model).
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # TPUs: the generation as JAX topology names spell it ("v5e" in "v5e:16x16"); GPUs: the product
    # TPUs: exactly what `jax.devices()[0].device_kind` reports, then the marketing name; GPUs: a part of the product
    # name their `device_kind` contains ("H100" in "NVIDIA H100 80GB HBM3").
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes: int | None  # per chip; None where one product name covers several sizes (A100 40/80 GB)
    chips_per_host: int  # TPU VMs of multi-host slices; GPUs: the usual 8-GPU server
    # B/16 training at 128 pairs/chip and 40% MFU: peak x 0.4 / 123.3 GFLOP per pair (metrics.train_flops_per_pair),
    # rounded to 10. The input pipeline sizes its worker processes for this rate (docs/performance.md).
    b16_images_per_s: int
    # TPU slices, for the planner:
    cloud_names: tuple[str, ...] = ()  # gcloud accelerator-type prefixes ("v5litepod" in "v5litepod-256")
    topology_dims: int = 0  # 2D torus for the "lite" chips, 3D for v4 / v5p
    cores_per_chip: int = 1  # Cloud names of v4 and v5p count TensorCores, two per chip
    chip_config: str = ""  # libtpu's chip_config_name: "megacore" is one JAX device per chip, as on a TPU VM
    single_host_chips: int = 0  # the largest slice on one host (v5e and v6e: 8 chips)
    hbm_bytes_per_s: float = 0.0  # HBM bandwidth per chip: the planner's memory-bound floor on a step's time

    @property
    def device_kind(self) -> str:
        """What JAX reports for it (TPUs); the table's name part for GPUs."""
        return self.device_kinds[0]

    @property
    def hbm_gib(self) -> float | None:
        return None if self.hbm_bytes is None else self.hbm_bytes / GIB

    def hosts(self, chips: int) -> int:
        """Hosts (TPU VM workers, GPU servers) in a slice or cluster of `chips`."""
        return 1 if chips <= max(self.single_host_chips, self.chips_per_host) else -(-chips // self.chips_per_host)


TPUS = {a.name: a for a in (
    Accelerator("v4", ("TPU v4",), 275e12, 32 * GIB, 4, 890, ("v4",), 3, 2, "megacore", 4, 1200e9),
    Accelerator("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 4, 640, ("v5litepod", "v5e"), 2, 1, "default", 8,
                819e9),
    Accelerator("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GIB, 4, 1490, ("v5p",), 3, 2, "megacore", 4, 2765e9),
    Accelerator("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 4, 2980, ("v6e",), 2, 1, "default", 8, 1640e9),
)}
GPUS = {a.name: a for a in (
    Accelerator("H100", ("H100",), 989e12, None, 8, 3210),  # 80 GB SXM/PCIe, 94 GB NVL
    Accelerator("H200", ("H200",), 989e12, 141 * 10 ** 9, 8, 3210),
    Accelerator("A100", ("A100",), 312e12, None, 8, 1010),  # 40 GB and 80 GB
)}
ACCELERATORS = {**TPUS, **GPUS}


def find(device_kind: str) -> Accelerator | None:
    """The accelerator a `device_kind` names, None when unknown. TPU kinds match exactly ("TPU v5" is v5p, a prefix
    of v5e's "TPU v5 lite"); GPU kinds by the product name they contain."""
    kind = device_kind.strip()
    for tpu in TPUS.values():
        if kind in tpu.device_kinds:
            return tpu
    if kind.lower().startswith("tpu"):
        return None
    return next((gpu for gpu in GPUS.values() if any(k.lower() in kind.lower() for k in gpu.device_kinds)), None)


def tpu(name: str) -> Accelerator | None:
    """A TPU generation by its JAX name ("v5e") or a Cloud accelerator-type prefix ("v5litepod"); None when unknown."""
    return TPUS.get(name) or next((t for t in TPUS.values() if name in t.cloud_names), None)
