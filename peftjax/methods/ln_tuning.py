"""LN tuning (PEFT's ``LNTuningConfig``) and the ``modules_to_save`` copies every method has: a
trainable copy of a leaf replaces the base while active.

One layer's array: ``weight`` (a full copy of the leaf). Merge swaps base and copy (PEFT's LN
tuning merge swaps the base layer and its copy; unmerge swaps back).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from ..config import AdapterConfig
from ..layout import Layout
from .base import COPY, Spec

#: PEFT's key infix of LN tuning copies: ``<module>.ln_tuning_layers.<param>``
LN_INFIX = "ln_tuning_layers"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LNTuningConfig(AdapterConfig):
    """LN tuning: a trainable copy of each targeted normalisation layer.

    Attributes:
      task_type: (shared)
      base_model_name_or_path: (shared)
      revision: (shared)
      inference_mode: (shared)
      target_modules: the normalisation modules to copy (a regex, or a list of names / dotted
        suffixes); ``None`` is accepted, but `inject` then raises.
      exclude_modules: (shared)
      modules_to_save: (shared)

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"norm": {"scale": jnp.ones(4)}},
      ...               LNTuningConfig(target_modules=["norm"]), key=0)
      >>> p["norm"]["scale"].arrays["default"]["weight"].tolist()  # a trainable copy
      [1.0, 1.0, 1.0, 1.0]
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    method: ClassVar[str] = "ln_tuning"

    def module_spec(self, path, layout, shape, mask):
        # a copy of a scanned model's norm keeps its stack axes (``layout``: only those count)
        stack = layout.stack if layout is not None else 0
        nl = 1
        for d in tuple(shape)[:stack]:
            nl *= d
        return CopySpec(
            layout=Layout("dense", stack=stack), shape=tuple(shape), scaling=(1.0,) * nl
        )

    @classmethod
    def from_specs(cls, entries, common):
        return cls(**common)


@dataclasses.dataclass(frozen=True)
class CopySpec(Spec):
    kind: str = "ln_tuning"  # or "modules_to_save"

    role: ClassVar[str] = COPY
    factored: ClassVar[bool] = False

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def file_infix(self) -> str | None:
        """The key infix of the copy's parameters (``None``: plain ``<module>.<param>``)."""
        return LN_INFIX if self.kind == "ln_tuning" else None

    def describe(self) -> str:
        return self.kind

    def sharding_roles(self):
        """A copy is sharded exactly as the leaf it copies."""
        return {"weight": tuple(range(len(self.shape) - self.layout.stack))}

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
