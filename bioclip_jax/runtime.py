"""Process-wide settings that speed up CPU runs. They change no result, only how fast it comes."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


# PCI ids of TPU chips (vendor Google 0x1ae0; v3, v4, v5p, v5e, v6e, TPU7x): the check JAX makes before loading libtpu.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def has_tpu_chips() -> bool:
    """True when TPU chips are attached to this host (PCI devices or /dev/accel*), without starting JAX."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == _GOOGLE_PCI_VENDOR and g.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel[0-9]*"))


def cpu_only() -> bool:
    """True when JAX can only run on the CPU here (asked without starting JAX's backend): JAX_PLATFORMS=cpu, or no
    GPU plugin installed and no TPU chip attached. libtpu alone does not count: it is also installed on CPU hosts to
    compile for TPU slices (`bioclip-jax plan`)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None and has_tpu_chips():
        return False
    # GPU plugins are `jax_plugins.*` modules or "jax_plugins" entry points (jax-cuda12-plugin, ROCm).
    if importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def keep_freed_host_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

    XLA's CPU backend allocates each step's temporaries afresh, hundreds of MB a step. glibc serves blocks that large
    with mmap and unmaps them on free, so every step page-faults them in again and spends much of its CPU time in the
    kernel. One arena that never trims or unmaps removes most of those faults (docs/performance.md has the demo
    step's numbers). The cost is a resident size that stays at its peak. It only works before JAX starts its threads
    (each thread keeps the arena it first used), so call it at the start of a process. Returns False where it cannot
    apply (not glibc)."""
    libc_name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or not glibc (macOS, Windows)
        return False
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, 64 << 20)]
    return all(mallopt(option, value) == 1 for option, value in settings)


def tune_for_cpu() -> bool:
    """keep_freed_host_memory() when this process can only run JAX on the CPU (on GPU and TPU hosts, one arena shared
    by the input pipeline's threads could cost more than it saves, and step temporaries live on the device)."""
    return cpu_only() and keep_freed_host_memory()


def quiet_libtpu() -> None:
    """Off a TPU VM, libtpu (loaded to compile for TPU slices: `bioclip-jax plan`) asks for this host's own worker
    hostnames and host bounds; with no metadata server to answer, it prints an `E0000 ... INVALID_ARGUMENT: unexpected
    worker hostname` error and a "Source Location Trace" on standard error (JAX's TPU_SKIP_MDS_QUERY=1 does not stop
    it). Naming a one-host slice answers it. The topology compiled for is unchanged (get_topology_desc gives the same
    devices and hosts for v4, v5e, v5p, v6e slices, and plan the same report). On a TPU VM, or with JAX_FORCE_TPU_INIT,
    JAX and the metadata server own these variables: nothing is set there."""
    if importlib.util.find_spec("libtpu") is None or "JAX_FORCE_TPU_INIT" in os.environ or has_tpu_chips():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
