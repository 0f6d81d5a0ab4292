"""LoHa (low-rank Hadamard product), as HF PEFT 0.21 (``peft/tuners/loha/layer.py``).

One layer's arrays in Flax orientation (each the transpose of PEFT's 2-D tensor):
``hada_w1_a (r, out)``, ``hada_w1_b (in, r)``, ``hada_w2_a (r, out)``, ``hada_w2_b (in, r)``,
where ``(in, out)`` is the layer's matrix view (a conv's ``in`` is ``in_channels * kh * kw``, as
PEFT flattens it). Delta: ``((w1_b @ w1_a) * (w2_b @ w2_a)) * scale``, PEFT's
``((w1a @ w1b) * (w2a @ w2b)) * scale`` transposed. LoHa has no cheaper factored form, so its
forward builds the delta of one module inside the step (``x @ dW``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from .base import Spec, kaiming_uniform, lycoris_dropout


@dataclasses.dataclass(frozen=True)
class LoHaSpec(Spec):
    r: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True

    method: ClassVar[str] = "loha"

    def describe(self) -> str:
        return f"loha(r={self.r})"

    def init_layer(self, key, w_layer, scale, dtype):
        n_in, n_out = self.in_out
        r = self.r
        k = jax.random.split(key, 4)
        w2_b = (
            kaiming_uniform(k[3], (n_in, r), n_in, dtype)
            if self.init_weights is False
            else jnp.zeros((n_in, r), dtype)
        )
        return {
            "hada_w1_a": kaiming_uniform(k[0], (r, n_out), r, dtype),
            "hada_w1_b": kaiming_uniform(k[1], (n_in, r), n_in, dtype),
            "hada_w2_a": kaiming_uniform(k[2], (r, n_out), r, dtype),
            "hada_w2_b": w2_b,
        }

    def delta_matrix(self, arrays, scale):
        f = lambda n: arrays[n].astype(jnp.float32)
        return (f("hada_w1_b") @ f("hada_w1_a")) * (f("hada_w2_b") @ f("hada_w2_a")) * scale

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        dw = self.delta_matrix(arrays, scale)
        d = x2.astype(jnp.float32) @ dw
        d = lycoris_dropout(d, rng, self.rank_dropout, self.module_dropout, rescale=True)
        return (y2.astype(jnp.float32) + d).astype(y2.dtype)
