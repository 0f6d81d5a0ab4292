"""LoHa (low-rank Hadamard product), as HF PEFT 0.21 (``peft/tuners/loha/layer.py``).

One layer's arrays in Flax orientation (each the transpose of PEFT's 2-D tensor):
``hada_w1_a (r, out)``, ``hada_w1_b (in, r)``, ``hada_w2_a (r, out)``, ``hada_w2_b (in, r)``,
where ``(in, out)`` is the layer's matrix view (a conv's ``in`` is ``in_channels * kh * kw``, as
PEFT flattens it). Delta: ``((w1_b @ w1_a) * (w2_b @ w2_a)) * scale``, PEFT's
``((w1a @ w1b) * (w2a @ w2b)) * scale`` transposed. LoHa has no cheaper factored form, so its
forward builds the delta of one module inside the step (``x @ dW``).

Effective conv (``use_effective_conv2d``, kernel larger than 1x1), PEFT's Tucker form:
``hada_t1 (kh, kw, r, r)`` (PEFT ``[r, r, kh, kw]`` transposed as a conv kernel, ``(2, 3, 1, 0)``),
``hada_w1_a (out, r)``, ``hada_w1_b (in_channels, r)`` (PEFT ``[r, out]``, ``[r, in]``
transposed), same for ``2``; ``R = einsum('klji,nj,pi->klnp', t, w_b, w_a)`` is PEFT's
``einsum('ijkl,jr,ip->prkl')`` in Flax layout and ``dW = R1 * R2 * scale``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from .. import _torch_layout as L
from ..config import check_bool
from .base import IN, OUT, RANK, Spec, kaiming_uniform, lycoris_dropout, one_value, spec_fields
from .lycoris import LycorisConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(LycorisConfig):
    """LoHa (Hadamard product of two low-rank products), as HF PEFT's `LoHaConfig`.

    Attributes:
      (shared: common)
      r: (shared: lycoris)
      alpha: (shared: lycoris)
      rank_dropout: (shared)
      module_dropout: (shared: lycoris)
      use_effective_conv2d: (shared)
      init_weights: ``True``: ``hada_w2_b`` starts at zero (the adapter starts as a no-op);
        ``False``: every factor random.
      layers_to_transform: (shared)
      layers_pattern: (shared)
      rank_pattern: (shared)
      alpha_pattern: (shared: lycoris)

    Example:

      >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]).scaling(4, 8)
      2.0
    """

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"

    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("init_weights", self.init_weights)

    def module_spec(self, path, layout, shape, mask):
        r, s = self.module_scale(path)
        return LoHaSpec(
            **spec_fields(layout, shape, mask, s),
            r=r,
            rank_dropout=float(self.rank_dropout),
            module_dropout=float(self.module_dropout),
            init_weights=self.init_weights,
            effective_conv=bool(self.use_effective_conv2d)
            and layout.kind == "conv"
            and math.prod(layout.spatial(shape)) > 1,
        )

    @classmethod
    def from_specs(cls, entries, common):
        big = cls.big_convs(entries)
        effective = (
            one_value(big, "use_effective_conv2d", lambda s: s.effective_conv) if big else False
        )
        return cls(**common, **cls.lycoris_fields(entries), use_effective_conv2d=effective)


@dataclasses.dataclass(frozen=True)
class LoHaSpec(Spec):
    r: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True
    effective_conv: bool = False

    method: ClassVar[str] = "loha"

    def describe(self) -> str:
        return f"loha(r={self.r})"

    @property
    def supports_lora_conversion(self) -> bool:
        return self.layout.kind == "dense"  # PEFT: the Linear layer only, not Conv2d

    def file_rules(self):
        out = {n: (n, L.TRANSPOSE) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        if self.effective_conv:  # Tucker cores [r, r, kh, kw] <-> (kh, kw, r, r)
            out.update({n: (n, L.CONV) for n in ("hada_t1", "hada_t2")})
        return out

    def sharding_roles(self):
        """Both Hadamard factors as LoRA's: ``w*_b (in, r)`` on the input sharding, ``w*_a (r,
        out)`` on the output's; the effective-conv Tucker layout stores ``w*_a (out, r)`` and
        ``w*_b (in_channels, r)``, its cores ``t* (*spatial, r, r)`` replicated."""
        if self.effective_conv:
            cin = len(self.layout.spatial(self.shape))
            return {n: (OUT, RANK) for n in ("hada_w1_a", "hada_w2_a")} | {
                "hada_w1_b": (cin, RANK),
                "hada_w2_b": (cin, RANK),
            }
        return {n: (RANK, OUT) for n in ("hada_w1_a", "hada_w2_a")} | {
            n: (IN, RANK) for n in ("hada_w1_b", "hada_w2_b")
        }

    def init_layer(self, key, w_layer, scale, dtype):
        n_in, n_out = self.in_out
        r = self.r
        if self.effective_conv:
            return self._init_effective(key, dtype)
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

    def _init_effective(self, key, dtype):
        r, sp = self.r, self.layout.spatial(self.shape)
        cin, cout = self.shape[-2], self.shape[-1]
        ksz = 1
        for s in sp:
            ksz *= s
        k = jax.random.split(key, 6)
        zero_b = self.init_weights is not False
        return {
            "hada_t1": kaiming_uniform(k[0], (*sp, r, r), r * ksz, dtype),
            "hada_w1_a": kaiming_uniform(k[1], (cout, r), cout, dtype),
            "hada_w1_b": kaiming_uniform(k[2], (cin, r), cin, dtype),
            "hada_t2": kaiming_uniform(k[3], (*sp, r, r), r * ksz, dtype),
            "hada_w2_a": kaiming_uniform(k[4], (cout, r), cout, dtype),
            "hada_w2_b": jnp.zeros((cin, r), dtype)
            if zero_b
            else kaiming_uniform(k[5], (cin, r), cin, dtype),
        }

    def delta_layer(self, arrays, scale):
        if not self.effective_conv:
            return super().delta_layer(arrays, scale)
        f = lambda n: arrays[n].astype(jnp.float32)
        r1 = jnp.einsum("...ji,nj,pi->...np", f("hada_t1"), f("hada_w1_b"), f("hada_w1_a"))
        r2 = jnp.einsum("...ji,nj,pi->...np", f("hada_t2"), f("hada_w2_b"), f("hada_w2_a"))
        return r1 * r2 * scale

    @property
    def factored(self) -> bool:  # type: ignore[override]
        return not self.effective_conv

    def delta_matrix(self, arrays, scale):
        if self.effective_conv:
            return self.to_matrix(self.delta_layer(arrays, scale))
        f = lambda n: arrays[n].astype(jnp.float32)
        return (f("hada_w1_b") @ f("hada_w1_a")) * (f("hada_w2_b") @ f("hada_w2_a")) * scale

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        dw = self.delta_matrix(arrays, scale)
        d = x2.astype(jnp.float32) @ dw
        d = lycoris_dropout(d, rng, self.rank_dropout, self.module_dropout, rescale=True)
        return (y2.astype(jnp.float32) + d).astype(y2.dtype)
