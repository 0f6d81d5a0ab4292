"""LoKr (low-rank Kronecker product), as HF PEFT 0.21 (``peft/tuners/lokr/layer.py``).

PEFT factors ``out = a * b`` and ``in = c * d`` with `factorization`, and builds
``dW = kron(w1 [a, c], w2 [b, d]) * scale``. Here every 2-D array is stored transposed (Flax
orientation), so ``dW^T = kron(w1^T, w2^T)`` is the ``(in, out)`` delta:

* ``lokr_w1 (c, a)``, or ``lokr_w1_b (c, r) @ lokr_w1_a (r, a)`` (decomposed, ``decompose_both``
  and ``r < max(a, c) / 2``);
* ``lokr_w2 (d, b)`` (conv: ``(kh, kw, d, b)``), or
  ``lokr_w2_b (d * kh * kw, r) @ lokr_w2_a (r, b)``
  (decomposed when ``r < max(b, d) / 2``).

A conv's ``in`` is its channel count (PEFT factors channels, not the flattened kernel).
Effective conv (``use_effective_conv2d``, decomposed ``w2``, kernel larger than 1x1):
``lokr_t2 (kh, kw, r, r)`` (PEFT ``[r, r, kh, kw]`` transposed ``(2, 3, 1, 0)``),
``lokr_w2_a (b, r)``, ``lokr_w2_b (d, r)`` (PEFT ``[r, b]``, ``[r, d]`` transposed) and
``w2 = einsum('klji,nj,pi->klnp', t2, w2_b, w2_a)``, PEFT's ``einsum('ijkl,ip,jr->prkl')``.
Forward never builds the Kronecker product: ``x (N, c*d) -> (N, c, d)`` and
``y = einsum('ncd,ca,db->nab')``, ``2 N (c d b + c a b)`` FLOPs instead of ``2 N c d a b``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from .. import _torch_layout as L
from ..config import check_bool, fail, is_int
from ..errors import UnsupportedModuleError
from .base import Spec, kaiming_uniform, lycoris_dropout, one_value, spec_fields
from .lycoris import LycorisConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``factorization``: ``(m, n)`` with ``m * n == dimension`` and ``m <= n``.

    With ``factor > 0`` dividing ``dimension``, ``(factor, dimension // factor)`` (unsorted).
    Otherwise the divisor pair nearest a square whose smaller side does not exceed ``factor``.
    LoKr splits each weight dimension this way (``LoKrConfig.decompose_factor`` is ``factor``).

    Args:
      dimension: the size to split (a positive int).
      factor: the largest allowed smaller factor; ``-1`` (default): no limit.

    Returns:
      ``(m, n)`` with ``m * n == dimension``.

    Raises:
      Nothing: PEFT's arithmetic, with no checks of its own (pass positive ints).

    Example:

      >>> import peftjax as pj
      >>> pj.factorization(768), pj.factorization(768, 8), pj.factorization(12, 5)
      ((24, 32), (8, 96), (3, 4))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    if m > n:
        n, m = m, n
    return m, n


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(LycorisConfig):
    """LoKr (Kronecker product of two factors), as HF PEFT's `LoKrConfig`.

    `init_weights` is True (w1 = 0), False (all random) or "lycoris" (w2 = 0).

    Attributes:
      (shared: common)
      r: (shared: lycoris)
      alpha: (shared: lycoris)
      rank_dropout: (shared)
      module_dropout: (shared: lycoris)
      use_effective_conv2d: (shared)
      init_weights: ``True`` (``lokr_w1 = 0``), ``False`` (all random) or ``"lycoris"``
        (``lokr_w2 = 0``).
      layers_to_transform: (shared)
      layers_pattern: (shared)
      rank_pattern: (shared)
      alpha_pattern: (shared: lycoris)
      decompose_both: also factor the left Kronecker matrix ``lokr_w1`` into
        ``lokr_w1_b @ lokr_w1_a`` (rank ``r``).
      decompose_factor: the Kronecker factor of each weight dimension (`factorization`'s ``factor``;
        ``-1``: the divisor pair nearest a square).
      rank_dropout_scale: whether rank dropout rescales the kept ranks while training.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((16, 8))}},
      ...               LoKrConfig(r=2, target_modules=["fc"]), key=0)
      >>> {k: v.shape for k, v in p["fc"]["kernel"].arrays["default"].items()}
      {'lokr_w1': (4, 2), 'lokr_w2': (4, 4)}
    """

    peft_type: ClassVar[str] = "LOKR"
    method: ClassVar[str] = "lokr"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("decompose_both", self.decompose_both)
        check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if not is_int(self.decompose_factor):
            raise fail("decompose_factor", self.decompose_factor, "must be an int (-1: automatic).")
        if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
            raise fail("init_weights", self.init_weights, "must be True, False or 'lycoris'.")

    def module_spec(self, path, layout, shape, mask):
        r, s = self.module_scale(path)
        return LoKrSpec(
            **spec_fields(layout, shape, mask, s),
            r=r,
            decompose_both=self.decompose_both,
            decompose_factor=self.decompose_factor,
            rank_dropout=float(self.rank_dropout),
            module_dropout=float(self.module_dropout),
            rank_dropout_scale=self.rank_dropout_scale,
            init_weights=self.init_weights,
            use_effective_conv2d=bool(self.use_effective_conv2d),
        )

    @classmethod
    def from_specs(cls, entries, common):
        one = lambda field: one_value(entries, field, lambda s: getattr(s, field))  # noqa: E731
        return cls(
            **common,
            **cls.lycoris_fields(entries),
            use_effective_conv2d=one_value(
                cls.big_convs(entries) or entries,
                "use_effective_conv2d",
                lambda s: s.use_effective_conv2d,
            ),
            decompose_both=one("decompose_both"),
            decompose_factor=one("decompose_factor"),
            rank_dropout_scale=one("rank_dropout_scale"),
        )


@dataclasses.dataclass(frozen=True)
class LoKrSpec(Spec):
    r: int = 8
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    init_weights: bool | str = True
    use_effective_conv2d: bool = False

    method: ClassVar[str] = "lokr"

    @property
    def supports_lora_conversion(self) -> bool:
        return self.layout.kind == "dense"  # PEFT: the Linear layer only, not Conv2d

    def __post_init__(self):
        super().__post_init__()
        if self.layout.kind == "conv" and len(self.layout.spatial(self.shape)) != 2:
            raise UnsupportedModuleError(
                "lokr adapts dense and 2-D conv weights (as PEFT: Linear, Conv2d); got a conv "
                f"kernel of shape {self.shape}."
            )

    # ---- factor shapes ----------------------------------------------------------------------
    @property
    def dims(self) -> tuple[int, int, int, int]:
        """``(a, b, c, d)``: ``out = a * b``, ``in = c * d`` (conv: channels)."""
        n_in, n_out = self.in_out
        if self.layout.kind == "conv":
            n_in = self.shape[-2]
        a, b = factorization(n_out, self.decompose_factor)
        c, d = factorization(n_in, self.decompose_factor)
        return a, b, c, d

    @property
    def use_w1(self) -> bool:
        a, _, c, _ = self.dims
        return not (self.decompose_both and self.r < max(a, c) / 2)

    @property
    def use_w2(self) -> bool:
        _, b, _, d = self.dims
        return not (self.r < max(b, d) / 2)

    @property
    def effective_conv(self) -> bool:
        """PEFT: ``use_effective_conv2d`` and a kernel larger than 1x1, in the decomposed branch."""
        sp = self.layout.spatial(self.shape)
        return self.use_effective_conv2d and bool(sp) and tuple(sp) != (1, 1) and not self.use_w2

    def file_rules(self):
        names = ["lokr_w1"] if self.use_w1 else ["lokr_w1_a", "lokr_w1_b"]
        names += ["lokr_w2"] if self.use_w2 else ["lokr_w2_a", "lokr_w2_b"]
        if self.effective_conv:
            names.append("lokr_t2")
        conv = self.layout.kind == "conv"
        return {
            n: (n, L.CONV if conv and n in ("lokr_w2", "lokr_t2") else L.TRANSPOSE) for n in names
        }

    def describe(self) -> str:
        return f"lokr(r={self.r})"

    def sharding_roles(self):
        """Replicated: a Kronecker factor's axes are factors of the weight's, not its axes, so
        no base sharding carries over (each factor is about ``sqrt`` the weight's size)."""
        return {}

    def init_layer(self, key, w_layer, scale, dtype):
        a, b, c, d = self.dims
        r = self.r
        sp = self.layout.spatial(self.shape)
        ksz = 1
        for s in sp:
            ksz *= s
        keys = iter(jax.random.split(key, 5))
        lycoris = self.init_weights == "lycoris"
        zero_w1 = self.init_weights is True
        zero_w2 = lycoris
        out = {}
        if self.use_w1:
            out["lokr_w1"] = (
                jnp.zeros((c, a), dtype)
                if zero_w1
                else kaiming_uniform(next(keys), (c, a), c, dtype)
            )
        else:
            out["lokr_w1_a"] = (
                jnp.zeros((r, a), dtype)
                if zero_w1
                else kaiming_uniform(next(keys), (r, a), r, dtype)
            )
            out["lokr_w1_b"] = kaiming_uniform(next(keys), (c, r), c, dtype)
        if self.use_w2:
            shape = (*sp, d, b)
            out["lokr_w2"] = (
                jnp.zeros(shape, dtype)
                if zero_w2
                else kaiming_uniform(next(keys), shape, d * ksz, dtype)
            )
        elif self.effective_conv:
            out["lokr_t2"] = kaiming_uniform(next(keys), (*sp, r, r), r * ksz, dtype)
            out["lokr_w2_a"] = kaiming_uniform(next(keys), (b, r), b, dtype)
            out["lokr_w2_b"] = (
                jnp.zeros((d, r), dtype)
                if zero_w2
                else kaiming_uniform(next(keys), (d, r), d, dtype)
            )
        else:
            out["lokr_w2_a"] = kaiming_uniform(next(keys), (r, b), r, dtype)
            out["lokr_w2_b"] = (
                jnp.zeros((d * ksz, r), dtype)
                if zero_w2
                else kaiming_uniform(next(keys), (d * ksz, r), d * ksz, dtype)
            )
        return out

    # ---- math -------------------------------------------------------------------------------
    def factors(self, arrays):
        """``(w1 (c, a), w2 (d, b) or (kh, kw, d, b))`` in float32."""
        f = lambda n: arrays[n].astype(jnp.float32)
        w1 = f("lokr_w1") if "lokr_w1" in arrays else f("lokr_w1_b") @ f("lokr_w1_a")
        if "lokr_w2" in arrays:
            w2 = f("lokr_w2")
        elif "lokr_t2" in arrays:
            w2 = jnp.einsum("...ji,nj,pi->...np", f("lokr_t2"), f("lokr_w2_b"), f("lokr_w2_a"))
        else:
            w2 = f("lokr_w2_b") @ f("lokr_w2_a")  # (d * k, b), PEFT's inner order (d, kh, kw)
            sp = self.layout.spatial(self.shape)
            if sp:
                _, b, _, d = self.dims
                w2 = jnp.moveaxis(w2.reshape(d, *sp, b), 0, len(sp))  # (kh, kw, d, b)
        return w1, w2

    def delta_layer(self, arrays, scale):
        w1, w2 = self.factors(arrays)
        if self.layout.kind == "conv":
            a, b, c, d = self.dims
            k = jnp.einsum("ca,...db->...cdab", w1, w2)
            k = k.reshape(*w2.shape[:-2], c * d, a * b)
            return k * scale
        return self.from_matrix(jnp.kron(w1, w2)) * scale

    def delta_matrix(self, arrays, scale):
        return self.to_matrix(self.delta_layer(arrays, scale))

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        a, b, c, d = self.dims
        w1, w2f = self.factors(arrays)
        x = x2.astype(jnp.float32).reshape(*x2.shape[:-1], c, d)
        t = jnp.einsum("...cd,db->...cb", x, w2f)
        y = jnp.einsum("...cb,ca->...ab", t, w1).reshape(*x2.shape[:-1], a * b) * scale
        y = lycoris_dropout(y, rng, self.rank_dropout, self.module_dropout, self.rank_dropout_scale)
        return (y2.astype(jnp.float32) + y).astype(y2.dtype)

    @property
    def factored(self) -> bool:  # type: ignore[override]
        return self.layout.kind != "conv"
