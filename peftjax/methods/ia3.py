"""IA3, as HF PEFT 0.21 (``peft/tuners/ia3/layer.py``): a learned vector scales a module's output,
or its input for ``feedforward_modules``.

One layer's array: ``ia3_l (out,)`` (PEFT ``[out, 1]``) or, feedforward, ``ia3_l (in,)`` (PEFT
``[1, in]``; a conv's ``in`` is its channel count). Merge multiplies the weight's output columns
(and the bias) or input rows; unmerge divides by ``l + 1e-8`` as PEFT does. Several active IA3
adapters multiply.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..errors import UnsupportedModuleError
from .base import Spec

EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class IA3Spec(Spec):
    feedforward: bool = False
    init_weights: bool = True

    method: ClassVar[str] = "ia3"
    identity: ClassVar[dict[str, float]] = {"ia3_l": 1.0}

    def __post_init__(self):
        super().__post_init__()
        if self.layout.kind == "embed":
            raise UnsupportedModuleError(
                "IA3 adapts dense and conv kernels (as PEFT: Linear, Conv); got an embedding."
            )

    @property
    def needs_base_output(self) -> bool:  # type: ignore[override]
        return self.feedforward

    def describe(self) -> str:
        return "ia3(ff)" if self.feedforward else "ia3"

    @property
    def n(self) -> int:
        n_in, n_out = self.in_out
        if not self.feedforward:
            return n_out
        return self.shape[-2] if self.layout.kind == "conv" else n_in

    def init_layer(self, key, w_layer, scale, dtype):
        if self.init_weights:
            return {"ia3_l": jnp.ones((self.n,), dtype)}
        return {"ia3_l": jax.random.normal(key, (self.n,), dtype)}

    def row_or_col(self, arrays, scale):
        """The effective vector on the matrix view: ``(out,)`` or, feedforward, ``(in,)``."""
        l = arrays["ia3_l"].astype(jnp.float32)
        l = jnp.where(scale != 0, l, jnp.ones_like(l))
        if self.feedforward and self.layout.kind == "conv":
            k = self.in_out[0] // self.shape[-2]
            l = jnp.repeat(l, k)  # matrix rows are ordered (in, *spatial)
        return l

    def _apply(self, w32, arrays, scale, op):
        m = self.to_matrix(w32)
        l = self.row_or_col(arrays, scale)
        l = l[:, None] if self.feedforward else l[None, :]
        return self.from_matrix(op(m, l))

    def merge_layer(self, w32, arrays, scale):
        return self._apply(w32, arrays, scale, lambda m, l: m * l), arrays

    def unmerge_layer(self, w32, arrays, scale):
        return self._apply(w32, arrays, scale, lambda m, l: m / (l + EPS)), arrays

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        l = self.row_or_col(arrays, scale)
        if self.feedforward:
            dt = jnp.promote_types(x2.dtype, w2.dtype)
            return ((x2 * l.astype(x2.dtype)).astype(dt) @ w2.astype(dt)).astype(y2.dtype)
        return (y2 * l.astype(y2.dtype)).astype(y2.dtype)

    def bias_vector(self, arrays, scale):
        """The factor an output-scaling IA3 applies to the module's bias (ones if feedforward)."""
        if self.feedforward:
            return None
        return self.row_or_col(arrays, scale)


@dataclasses.dataclass(frozen=True)
class IA3BiasSpec(Spec):
    """Marks a bias whose module carries output-scaling IA3 adapter(s): the bias is scaled by
    the ``ia3_l`` of the sibling weight leaf ``owner`` (no arrays of its own)."""

    owner: str = "kernel"

    method: ClassVar[str] = "ia3_bias"
    factored: ClassVar[bool] = False

    def init_layer(self, key, w_layer, scale, dtype):
        return {}

    def describe(self) -> str:
        return f"ia3 bias (of {self.owner})"
