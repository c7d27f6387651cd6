"""The CPU host-allocator setting applies only where JAX can run on nothing but the CPU; libtpu's TPU-VM variables
are named only off a TPU VM."""

from __future__ import annotations

import importlib.util
import os
import platform

import pytest

from bioclip_jax import runtime


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_cpu_only_follows_jax_platforms(platforms, expected, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert runtime.cpu_only() is expected


def test_tune_for_cpu_skips_accelerator_hosts(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(runtime, "keep_freed_host_memory", lambda: pytest.fail("must not touch the allocator"))
    assert runtime.tune_for_cpu() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
def test_keep_freed_host_memory_applies_on_glibc():
    assert runtime.keep_freed_host_memory() is True


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="only matters where libtpu is installed")
@pytest.mark.parametrize("chips, expected", [(False, ("localhost", "1,1,1")), (True, (None, None))])
def test_quiet_libtpu_names_a_one_host_slice_only_off_a_tpu_vm(chips, expected, monkeypatch):
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS", "JAX_FORCE_TPU_INIT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "has_tpu_chips", lambda: chips)
    runtime.quiet_libtpu()
    assert (os.environ.get("TPU_WORKER_HOSTNAMES"), os.environ.get("TPU_HOST_BOUNDS")) == expected
