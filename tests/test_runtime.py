"""The CPU host-allocator setting applies only where JAX can run on nothing but the CPU."""

from __future__ import annotations

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
