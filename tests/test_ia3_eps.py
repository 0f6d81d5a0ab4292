"""IA3's unmerge divides by ``l + 1e-8`` (PEFT's ``ia3/layer.py``): with vectors near zero the
eps decides the result, so these values make it observable (EPS = 0 gives inf/nan, 1e-6 gives
other weights)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj


def _with_vector(value: float, feedforward: bool):
    w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)  # Flax (in, out)
    p = {"fc": {"kernel": jnp.asarray(w)}}
    cfg = pj.IA3Config(target_modules=["fc"], feedforward_modules=["fc"] if feedforward else None)
    q = pj.inject(p, cfg, key=0)
    node = q["fc"]["kernel"]
    n = 3 if feedforward else 4
    arrays = {"default": {"ia3_l": jnp.full((n,), value, jnp.float32)}}
    return w, {"fc": {"kernel": node.replace(arrays=arrays)}}


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("value", [1e-8, 0.0])
def test_unmerge_divides_by_l_plus_peft_eps(value, feedforward):
    w, q = _with_vector(value, feedforward)
    merged = np.asarray(pj.merge(q)["fc"]["kernel"].base)
    back = np.asarray(pj.unmerge(pj.merge(q))["fc"]["kernel"].base)
    l = np.float32(value)
    # PEFT: merge W * l, unmerge (W * l) / (l + 1e-8), in float32
    want_merged = w * l
    want_back = (want_merged / (l + np.float32(1e-8))).astype(np.float32)
    np.testing.assert_array_equal(merged, want_merged)
    np.testing.assert_allclose(back, want_back, rtol=1e-6, atol=0)
    assert np.all(np.isfinite(back))
    if value:  # l = eps: the round trip halves the weights, as PEFT's does
        np.testing.assert_allclose(back, w / 2, rtol=1e-6)
