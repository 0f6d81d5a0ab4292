"""`pj.apply` and merged inference compile once per tree structure (chex's trace counter), and
give the same outputs with and without `jax.jit` (chex variants)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

import peftjax as pj
from tests.conftest import make_llama, randomize
from tests.test_forward import _llama_fn

IDS = jnp.array([[1, 5, 31, 0, 7], [2, 2, 9, 30, 4]])
CFG = pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def adapted():
    return randomize(pj.inject(make_llama(n_layers=1), CFG, key=jax.random.key(0)), seed=1)


def test_apply_traces_once_per_structure(adapted):
    """New adapter values (a training step, a hotswap) reuse the compiled function."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(p, x):
        return pj.apply(_llama_fn)(p, x)

    first = serve(adapted, IDS)
    again = serve(randomize(adapted, seed=2), IDS)
    assert not jnp.allclose(first, again)  # the new values are used, without a retrace
    chex.clear_trace_counter()


def test_merged_inference_traces_once(adapted):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(p, x):
        return _llama_fn(p, x)

    merged = pj.merge_and_unload(adapted)
    serve(merged, IDS)
    serve(pj.merge_and_unload(randomize(adapted, seed=3)), IDS)
    chex.clear_trace_counter()


class TestApplyVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_equals_merged(self):
        p = randomize(pj.inject(make_llama(n_layers=1), CFG, key=jax.random.key(0)), seed=1)
        got = self.variant(pj.apply(_llama_fn))(p, IDS)
        want = _llama_fn(pj.merge_and_unload(p), IDS)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
