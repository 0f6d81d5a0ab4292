"""LN tuning and ``modules_to_save``: a trainable copy of a leaf replaces the base while active.

One layer's array: ``weight`` (a full copy of the leaf). Merge swaps base and copy (PEFT's LN
tuning merge swaps the base layer and its copy; unmerge swaps back).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from .base import Spec


@dataclasses.dataclass(frozen=True)
class CopySpec(Spec):
    kind: str = "ln_tuning"  # or "modules_to_save"

    method: ClassVar[str] = "copy"
    factored: ClassVar[bool] = False

    def describe(self) -> str:
        return self.kind

    def init_layer(self, key, w_layer, scale, dtype):
        return {"weight": w_layer}

    def init(self, key, base, dtype=None):  # keep the leaf's own dtype: a copy is exact
        return {"weight": jnp.array(base, copy=True)}

    def value(self, base, arrays):
        """The leaf value while this adapter is active."""
        copy = arrays["weight"]
        if self.layout.stack == 0:
            return copy
        on = (self.scale_array() != 0).reshape(self.layout.stack_shape(self.shape))
        on = on.reshape(on.shape + (1,) * (copy.ndim - on.ndim))
        return jnp.where(on, copy, base)

    def merge(self, w, arrays):
        new = self.value(w, arrays)
        old = self.value(arrays["weight"], {"weight": w})
        return new, {"weight": old}

    unmerge = merge
