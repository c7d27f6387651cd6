"""Shared fixtures. open_clip (PyTorch) is the reference oracle; every model is randomly initialised, offline."""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path

# A persistent compilation cache for the tests and the processes they start (they inherit the environment): many tests
# compile the same training step or encoder, and a rerun of the suite finds them all compiled. Before JAX is imported,
# which reads these variables. The folder is ignored by git; delete it to measure cold compiles.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 - after the cache settings above
import numpy as np
import pytest

from bioclip_jax.models.config import get_model_config
from bioclip_jax.runtime import quiet_libtpu, tune_for_cpu

tune_for_cpu()  # as the CLI does: the tests run many small CPU training steps
quiet_libtpu()  # as the CLI does: no libtpu worker-hostname error on every test process's first device use


@functools.lru_cache(maxsize=3)
def open_clip_reference(name: str, seed: int = 0):
    """(torch model in eval mode, its state_dict as numpy) for an open_clip architecture, with every tensor
    perturbed so that LayerNorm weights, biases and logit_scale are not their trivial init values (a converter that
    swapped or dropped them would otherwise pass)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    model.eval()
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, state_dict


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each module compiles its own programs; dropping them afterwards keeps the suite's memory flat (it grew to
    16 GB of the machine's 24 by the end)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


CAPTIONS = [
    "a photo of Pica hudsonia.",
    "a photo of black-billed magpie.",
    "a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia with common name black-billed magpie.",
    "a photo of kingdom Animalia phylum Chordata class Aves order Passeriformes family Corvidae genus Pica "
    "species hudsonia.",
    "a photo of Plantae Tracheophyta Magnoliopsida Rosales Rosaceae Rosa canina with common name dog rose.",
    "",
]


# open_clip's kwargs for the registry's `tiny` architecture (one definition: bioclip_jax.models.config).
TINY_OPEN_CLIP_CFG = get_model_config("tiny").to_open_clip()


@pytest.fixture(scope="session")
def tiny_open_clip():
    """(open_clip CLIP of the `tiny` architecture with perturbed weights, its numpy state_dict)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape))
    model.eval()
    return model, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
