"""VeRA, as HF PEFT 0.21 (``peft/tuners/vera``): one pair of frozen random projections shared by
every adapted module, and two trainable vectors per module.

Arrays, Flax orientation (``in`` before ``out``):

* shared, once per adapter, on its *holder* leaf (the first adapted module in tree order; the
  other modules' specs name it, `Spec.shared_holder`): ``vera_A (in_max, r)`` (PEFT's
  ``vera_A [r, in_max]``) and ``vera_B (r, out_max)`` (PEFT's ``vera_B [out_max, r]``), with
  ``(in_max, out_max)`` the elementwise maximum of the targets' ``(in, out)``. They are buffers
  (`Spec.buffers`: PEFT does not count them) and never train (`Spec.frozen_arrays`: `partition`
  keeps them in the frozen half, so they get no gradient and no optimizer state).
* per module: ``vera_lambda_b (out,)`` and ``vera_lambda_d (r,)``; init (``init_weights=True``)
  ``lambda_b = 0``, ``lambda_d = d_initial``; ``init_weights=False`` as PEFT: ``lambda_b = 1``,
  ``lambda_d ~ N(0, 1)`` (drawn with JAX's generator).

A module of ``(in, out)`` uses the slices ``A_s = vera_A[:in]``, ``B_s = vera_B[:, :out]``:
forward ``y + (((x_d A_s) * lambda_d) B_s) * lambda_b`` (``x_d`` = dropout(x), ``vera_dropout``),
delta ``(A_s * lambda_d) (B_s * lambda_b)``, merge / unmerge ``W +- delta``.

**The projections are PEFT's, bit for bit.** PEFT draws them with one CPU ``torch.Generator``
seeded by ``projection_prng_key``: ``vera_A`` first (row-major, kaiming-uniform with fan-in
``in_max``), then ``vera_B`` (fan-in ``r``). `projections` reproduces that with NumPy only: the
generator is MT19937 seeded by ``init_genrand(seed)``, whose 32-bit words are NumPy's legacy
``RandomState(seed)`` stream (frozen by NEP 19); ``Tensor.uniform_(lo, hi)`` keeps a word's low
24 bits, ``u = (w & 0xFFFFFF) 2^-24``, and returns ``fl32(u fl32(hi - lo) + lo)`` with
``lo = fl32(-bound)``, ``hi = fl32(bound)``, ``bound = sqrt(3) sqrt(2) / sqrt(fan_in)``.
``projection_prng_key`` must be in ``[0, 2^32)``.

**Files.** ``save_projection=True`` writes ``base_model.vera_A [r, in_max]`` and
``base_model.vera_B [out_max, r]`` once (from the holder; `Method.shared_keys`) besides each
module's ``vera_lambda_b`` / ``vera_lambda_d``; ``False`` writes only the lambdas and loading
regenerates the projections from ``projection_prng_key`` (PEFT's behaviour and its warning's
caveat: exact here on every platform).

**Several VeRA adapters in one tree** get PEFT's values. PEFT keeps one ``vera_A`` / ``vera_B``
for the model: a later adapter uses the first adapter's pair (sliced per module), must have the
same ``projection_prng_key`` and ``save_projection``, and its modules must fit in the first's
projections. Here every adapter holds its own copy (adapters are independent values in a
pytree), generated at the first adapter's sizes with the same key, so the copies are equal and
each module's slices are PEFT's. Refused, naming the reason: another key or ``save_projection``
(PEFT raises too), a module wider than the first adapter's projections (PEFT raises), another
``r`` (PEFT raises for a larger one and fails in its forward for a smaller one). "The first"
is any VeRA adapter already in the tree: they all share the first's sizes.

Stacked (scanned) weights are supported: the lambdas carry the stack axes, the projections do
not (one pair for every layer slice); `expand` broadcasts them for the scan, and merge vmaps the
layer rule over the lambdas only. Only dense weights (PEFT: ``Linear``, ``Conv1D``) are adapted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import _torch_layout as L
from ..config import (
    AdapterConfig,
    check_bool,
    check_dropout,
    check_rank,
    fail,
    is_int,
    is_real,
    unsupported,
)
from ..errors import ConfigError, PeftJaxError, ShapeError, UnsupportedModuleError
from .base import OUT, RANK, Spec, dropout, one_value, spec_fields

#: PEFT's file keys of the shared projections (``base_model.vera_A.<adapter>`` in its live
#: state dict, saved without the adapter name).
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"
SHARED = frozenset({"vera_A", "vera_B"})

__all__ = ["VERA_A_KEY", "VERA_B_KEY", "VeraConfig", "VeraSpec", "mt19937_words", "projections"]


# ------------------------------------------------------------------------------ projections


def mt19937_words(seed: int, n: int) -> np.ndarray:
    """The first ``n`` 32-bit outputs (``uint64``) of MT19937 seeded by ``init_genrand(seed)``:
    the stream of a CPU ``torch.Generator().manual_seed(seed)``."""
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"MT19937 seed {seed!r}: expected an int in [0, 2**32).")
    return np.random.RandomState(seed).randint(0, 2**32, size=int(n), dtype=np.uint64)


def _kaiming_bound(fan_in: int) -> float:
    """PEFT's ``_kaiming_init``: gain ``sqrt(2)``, ``bound = sqrt(3) * gain / sqrt(fan_in)``."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


def _uniform(words: np.ndarray, bound: float) -> np.ndarray:
    """torch's CPU float32 ``uniform_(-bound, bound)`` from its generator words."""
    lo, hi = np.float32(-bound), np.float32(bound)
    u = (words & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    return (u * np.float64(hi - lo) + np.float64(lo)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def projections(seed: int, r: int, in_max: int, out_max: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(vera_A [r, in_max], vera_B [out_max, r])`` (torch layout, float32, read-only)
    for ``projection_prng_key=seed``, bit for bit (module docstring)."""
    words = mt19937_words(seed, r * in_max + out_max * r)
    a = _uniform(words[: r * in_max], _kaiming_bound(in_max)).reshape(r, in_max)
    b = _uniform(words[r * in_max :], _kaiming_bound(r)).reshape(out_max, r)
    a.flags.writeable = b.flags.writeable = False
    return a, b


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(AdapterConfig):
    """VeRA, as HF PEFT's `VeraConfig` (same fields and defaults).

    `bias` other than ``"none"`` (trainable base biases) is not supported. PEFT's `VeraConfig`
    has no `exclude_modules`: it must stay ``None`` and is not written to the file.

    Attributes:
      task_type: (shared)
      base_model_name_or_path: (shared)
      revision: (shared)
      inference_mode: (shared)
      target_modules: (shared)
      exclude_modules: not a field of PEFT's ``VeraConfig``: must stay ``None`` (narrow
        ``target_modules`` instead) and is not written to the file.
      modules_to_save: (shared)
      r: the rank of the shared projections ``vera_A`` / ``vera_B``.
      projection_prng_key: the seed of the shared random projections, in ``[0, 2**32)``; peftjax
        reproduces PEFT's (torch's) draw bit for bit.
      save_projection: write the shared projections into the adapter file (``False``: PEFT redraws
        them from the seed).
      vera_dropout: dropout probability on the adapter's input while training.
      d_initial: the initial value of ``vera_lambda_d``.
      fan_in_fan_out: (shared)
      bias: PEFT's trainable biases: only ``"none"`` is supported.
      init_weights: ``True``: ``vera_lambda_b = 0`` (a no-op) and ``vera_lambda_d = d_initial``;
        ``False``: ``vera_lambda_b = 1``, ``vera_lambda_d`` random normal.
      layers_to_transform: (shared)
      layers_pattern: (shared)

    Example:

      >>> cfg = VeraConfig(r=4, target_modules=["q_proj", "v_proj"])
      >>> cfg.projection_prng_key, "exclude_modules" in cfg.to_dict()
      (0, False)
    """

    peft_type: ClassVar[str] = "VERA"
    method: ClassVar[str] = "vera"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        key = self.projection_prng_key
        if not is_int(key) or not 0 <= key < 2**32:
            raise fail(
                "projection_prng_key",
                key,
                "peftjax reproduces torch's generator for int seeds in [0, 2**32).",
            )
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            check_bool(name, getattr(self, name))
        check_dropout("vera_dropout", self.vera_dropout)
        if not is_real(self.d_initial):
            raise fail("d_initial", self.d_initial, "must be a finite number.")
        if self.bias not in ("none", "all", "vera_only"):
            raise fail("bias", self.bias, "must be 'none', 'all' or 'vera_only'.")
        if self.bias != "none":
            raise unsupported("bias", self.bias, "none")
        if self.exclude_modules is not None:
            raise fail(
                "exclude_modules",
                self.exclude_modules,
                "PEFT's VeraConfig has no such field; leave it None (narrow `target_modules`).",
            )
        # PEFT: layers_* with a str target_modules are ignored by the matcher (not an error).
        self._check_layers(str_targets_forbidden=False)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("exclude_modules", None)  # not a VeraConfig field in PEFT
        return out

    # ---- planning ---------------------------------------------------------------------------
    def _spec(self, path, layout, shape, mask, dims, holder) -> VeraSpec:
        return VeraSpec(
            **spec_fields(layout, shape, mask, 1.0),
            r=self.r,
            proj_in=dims[0],
            proj_out=dims[1],
            prng_key=self.projection_prng_key,
            save_projection=self.save_projection,
            holder=holder,
            vera_dropout=float(self.vera_dropout),
            d_initial=float(self.d_initial),
            init_weights=self.init_weights,
        )

    def module_specs(self, items):
        return self.module_specs_beside(items, {})

    def module_specs_beside(self, items, existing):
        """The specs of one injection: the projections sized over every target (PEFT's
        ``_find_dim``), or at the sizes of a VeRA adapter already in the tree (``existing``),
        whose key, ``save_projection`` and ``r`` must then be this config's (module docstring);
        the first module holds them."""
        if not items:
            return []
        dims = [(path, layout.in_out(tuple(shape))) for path, layout, shape, _ in items]
        first = _first_vera(existing)
        if first is None:
            size = (max(io[0] for _, io in dims), max(io[1] for _, io in dims))
        else:
            other, spec = first
            why = {"r": " (PEFT raises for a larger r; a smaller one fails in its forward)"}
            for field, mine, theirs in (
                ("projection_prng_key", self.projection_prng_key, spec.prng_key),
                ("save_projection", self.save_projection, spec.save_projection),
                ("r", self.r, spec.r),
            ):
                if mine != theirs:
                    raise fail(
                        field,
                        mine,
                        f"VeRA adapter {other!r} in the tree has {field}={theirs!r}; PEFT shares "
                        "one vera_A / vera_B across all VeRA adapters of a model, so a later "
                        f"adapter needs the same {field}{why.get(field, '')}.",
                    )
            size = (spec.proj_in, spec.proj_out)
        for path, (n_in, n_out) in dims:
            if n_in > size[0] or n_out > size[1]:
                raise ShapeError(
                    f"module `{path}`: its (in, out) = ({n_in}, {n_out}) do not fit the "
                    f"(in_max, out_max) = {size} of the VeRA projections of adapter "
                    f"{first[0]!r} already in the tree; PEFT shares those projections with "
                    "every later VeRA adapter (inject the widest adapter first)."
                )
        holder = items[0][0]
        out = []
        for i, (path, layout, shape, mask) in enumerate(items):
            try:
                out.append(self._spec(path, layout, shape, mask, size, holder if i else None))
            except PeftJaxError as err:
                if f"`{path}`" in str(err):
                    raise
                raise type(err)(f"module `{path}`: {err}") from None
        return out

    def module_spec(self, path, layout, shape, mask):
        return self.module_specs([(path, layout, tuple(shape), mask)])[0]

    @classmethod
    def from_specs(cls, entries, common):
        pick = lambda field, get: one_value(entries, field, get)  # noqa: E731
        return cls(
            **common,
            r=pick("r", lambda s: s.r),
            projection_prng_key=pick("projection_prng_key", lambda s: s.prng_key),
            save_projection=pick("save_projection", lambda s: s.save_projection),
            vera_dropout=pick("vera_dropout", lambda s: s.vera_dropout),
            d_initial=pick("d_initial", lambda s: s.d_initial),
            init_weights=pick("init_weights", lambda s: s.init_weights),
        )

    def check_module(self, peft_path, spec):
        for field, mine, theirs in (
            ("r", self.r, spec.r),
            ("projection_prng_key", self.projection_prng_key, spec.prng_key),
            ("save_projection", self.save_projection, spec.save_projection),
        ):
            if mine != theirs:
                raise ConfigError(
                    f"`config.{field}`={mine!r} disagrees with the adapter on `{peft_path}` "
                    f"({theirs!r})."
                )


def _first_vera(existing: Mapping[str, list]) -> tuple[str, VeraSpec] | None:
    """``(name, spec)`` of a VeRA adapter already in the tree (its holder's spec)."""
    for name, mods in existing.items():
        for _, spec in mods:
            if isinstance(spec, VeraSpec):
                return name, spec
    return None


# ------------------------------------------------------------------------------ spec


@dataclasses.dataclass(frozen=True)
class VeraSpec(Spec):
    """One module's VeRA adapter. ``proj_in`` / ``proj_out``: the shared projections' sizes
    (in_max, out_max); ``holder``: the module path of the leaf holding them (``None`` on the
    holder itself)."""

    r: int = 256
    proj_in: int = 0
    proj_out: int = 0
    prng_key: int = 0
    save_projection: bool = True
    holder: str | None = None
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True

    method: ClassVar[str] = "vera"
    shared: ClassVar[frozenset[str]] = SHARED
    frozen_arrays: ClassVar[frozenset[str]] = SHARED
    buffers: ClassVar[frozenset[str]] = SHARED

    def __post_init__(self):
        super().__post_init__()
        if self.layout.kind != "dense":
            raise UnsupportedModuleError(
                f"VeRA adapts dense weights only (as PEFT: Linear, Conv1D); got a "
                f"{self.layout.kind} weight of shape {self.shape}."
            )
        n_in, n_out = self.in_out
        if n_in > self.proj_in or n_out > self.proj_out:
            raise ShapeError(
                f"the VeRA projections cover (in, out) up to ({self.proj_in}, {self.proj_out}), "
                f"but the weight is ({n_in}, {n_out})."
            )

    def describe(self) -> str:
        return f"vera(r={self.r})"

    def shared_holder(self) -> str | None:
        return self.holder

    def sharding_roles(self):
        """``lambda_b (out,)`` follows the output sharding, ``lambda_d (r,)`` the rank; the
        shared projections (sized for the largest target) are replicated."""
        return {"vera_lambda_b": (OUT,), "vera_lambda_d": (RANK,)}

    # ---- init ---------------------------------------------------------------------------
    def init_layer(self, key, w_layer, scale, dtype):
        n_out = self.in_out[1]
        if self.init_weights:
            return {
                "vera_lambda_b": jnp.zeros((n_out,), dtype),
                "vera_lambda_d": jnp.full((self.r,), self.d_initial, dtype),
            }
        return {
            "vera_lambda_b": jnp.ones((n_out,), dtype),
            "vera_lambda_d": jax.random.normal(key, (self.r,), dtype),
        }

    def projection_arrays(self, dtype=jnp.float32) -> dict:
        """The shared ``vera_A (in_max, r)``, ``vera_B (r, out_max)`` (Flax orientation)."""
        a, b = projections(self.prng_key, self.r, self.proj_in, self.proj_out)
        return {"vera_A": jnp.asarray(a.T, dtype), "vera_B": jnp.asarray(b.T, dtype)}

    def init(self, key, base, dtype=jnp.float32):
        """`Spec.init` (layer ``i`` from ``split(key, n)[i]``) without reading ``base``: VeRA's
        values do not depend on it, so an abstract base (``ShapeDtypeStruct``) works too."""
        stack = self.layout.stack_shape(self.shape)
        fn = lambda k: self.init_layer(k, None, None, dtype)  # noqa: E731
        if not stack:
            arrays = fn(key)
        else:
            keys = jax.random.split(key, self.n_layers)
            arrays = jax.vmap(fn)(keys[np.asarray(self.stored_layers)])
            if not self.compact:
                arrays = {k: v.reshape(stack + v.shape[1:]) for k, v in arrays.items()}
        if self.holder is None:
            arrays.update(self.projection_arrays(dtype))
        return arrays

    # ---- math -----------------------------------------------------------------------------
    def _sliced(self, arrays):
        """``(A_s (in, r), B_s (r, out))`` of this module."""
        try:
            a, b = arrays["vera_A"], arrays["vera_B"]
        except KeyError:
            raise ShapeError(
                "VeRA rule called without the shared projections (vera_A / vera_B): they live "
                f"on the holder leaf `{self.holder}`, which generic code adds (with_shared)."
            ) from None
        n_in, n_out = self.in_out
        if a.shape[-2] < n_in or b.shape[-1] < n_out:
            raise ShapeError(
                f"VeRA projections vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)} cannot "
                f"cover a weight with (in, out) = ({n_in}, {n_out})."
            )
        return a[..., :n_in, :], b[..., :, :n_out]

    def delta_matrix(self, arrays, scale):
        a, b = (v.astype(jnp.float32) for v in self._sliced(arrays))
        ld = arrays["vera_lambda_d"].astype(jnp.float32)
        lb = arrays["vera_lambda_b"].astype(jnp.float32)
        return ((a * ld[None, :]) @ (b * lb[None, :])) * scale

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        a, b = self._sliced(arrays)
        ld, lb = arrays["vera_lambda_d"], arrays["vera_lambda_b"]
        dt = jnp.promote_types(a.dtype, ld.dtype)  # PEFT casts x to the lambdas' dtype
        xd = dropout(x2.astype(dt), self.vera_dropout, rng)
        h = (xd @ a.astype(dt)) * (ld.astype(dt) * jnp.asarray(scale, dt))
        out = (h @ b.astype(dt)) * lb.astype(dt)
        acc = jnp.promote_types(y2.dtype, out.dtype)
        return (y2.astype(acc) + out).astype(y2.dtype)

    def fusable(self, training):
        return not (training and self.vera_dropout > 0)

    # ---- shared arrays over stacked layers ---------------------------------------------------
    def _split(self, arrays):
        own = {k: v for k, v in arrays.items() if k not in SHARED}
        return own, {k: v for k, v in arrays.items() if k in SHARED}

    def _fold(self, rule, w32, arrays):
        """Run a layer rule over the stored layers with the projections held fixed (they have
        no stack axes); returns the arrays given, shared ones included."""
        own, shared = self._split(arrays)

        def fn(w, a, s):
            w, out = rule(w, {**a, **shared}, s)
            return w, {k: v for k, v in out.items() if k not in SHARED}

        w, own = self._over_layers(fn, w32, own)
        return w, {**own, **shared}

    def merge(self, w32, arrays):
        return self._fold(self.merge_layer, w32, arrays)

    def unmerge(self, w32, arrays):
        return self._fold(self.unmerge_layer, w32, arrays)

    def expand(self, arrays):
        """Full-stack arrays for the scanned forward: the lambdas as `Spec.expand`, the
        projections broadcast over the stack axes (every layer slice uses the same pair)."""
        own, shared = self._split(arrays)
        own = super().expand(own)
        stack = self.layout.stack_shape(self.shape)
        if stack:
            shared = {k: jnp.broadcast_to(v, stack + v.shape) for k, v in shared.items()}
        return {**own, **shared}

    # ---- files ------------------------------------------------------------------------------
    def file_rules(self):
        return {
            "vera_lambda_b": ("vera_lambda_b", L.SAME),
            "vera_lambda_d": ("vera_lambda_d", L.SAME),
        }

    def shared_file_keys(self):
        if self.holder is not None or not self.save_projection:
            return {}
        return {"vera_A": (VERA_A_KEY, L.TRANSPOSE), "vera_B": (VERA_B_KEY, L.TRANSPOSE)}
