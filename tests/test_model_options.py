"""Model options: bf16 compute over fp32 params, rematerialisation, attention implementation, activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CAPTIONS

import bioclip_jax
from bioclip_jax.models import CLIP
from bioclip_jax.models.layers import REMAT_POLICIES, exact_gelu, quick_gelu


@pytest.fixture(scope="module")
def tiny():
    model = bioclip_jax.create_model("tiny", seed=1)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    tokens = jnp.asarray(bioclip_jax.tokenize(CAPTIONS[:2]))
    return model, images, tokens


def _contrastive_loss(module, params, images, tokens):
    image, text, scale = module.apply({"params": params}, images, tokens)
    logits = scale * image @ text.T
    labels = jnp.arange(len(logits))
    return -(jax.nn.log_softmax(logits)[labels, labels].mean() + jax.nn.log_softmax(logits.T)[labels, labels].mean())


@pytest.mark.integration  # compiles ViT-B/16 steps
@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_changes_memory_not_math(tiny, policy):
    model, images, tokens = tiny
    plain = jax.value_and_grad(lambda p: _contrastive_loss(CLIP(model.config), p, images, tokens))(model.params)
    remat = jax.value_and_grad(lambda p: _contrastive_loss(CLIP(model.config, remat=policy), p, images, tokens))(
        model.params)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(plain[1]), jax.tree_util.tree_leaves(remat[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_remat_policy(tiny):
    model, images, tokens = tiny
    with pytest.raises(ValueError, match="remat='most'"):
        CLIP(model.config, remat="most").apply({"params": model.params}, images, tokens)


@pytest.mark.integration  # compiles ViT-B/16 steps
def test_bf16_compute_keeps_fp32_params_and_outputs(tiny):
    model, images, tokens = tiny
    fp32 = CLIP(model.config).apply({"params": model.params}, images, tokens)
    bf16 = CLIP(model.config, dtype=jnp.bfloat16).apply({"params": model.params}, images, tokens)
    grads = jax.grad(lambda p: _contrastive_loss(CLIP(model.config, dtype=jnp.bfloat16), p, images, tokens))(
        model.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    for a, b in zip(fp32[:2], bf16[:2]):
        assert b.dtype == jnp.float32
        cosine = np.sum(np.asarray(a) * np.asarray(b), axis=-1)
        assert cosine.min() > 0.99


def test_default_attention_implementation_agrees_with_xla(tiny):
    model, images, tokens = tiny
    xla = CLIP(model.config, attn_implementation="xla").apply({"params": model.params}, images, tokens)
    auto = CLIP(model.config, attn_implementation=None).apply({"params": model.params}, images, tokens)
    for a, b in zip(xla[:2], auto[:2]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_activations_match_torch():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    np.testing.assert_allclose(exact_gelu(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=1e-6)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(quick_gelu(x), (t * torch.sigmoid(1.702 * t)).numpy(), atol=1e-6)


def test_logit_scale_is_stored_as_log(tiny):
    model, images, tokens = tiny
    assert model.params["logit_scale"].shape == ()
    np.testing.assert_allclose(model.logit_scale, 1 / 0.07, rtol=1e-6)
