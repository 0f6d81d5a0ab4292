"""IA3, as HF PEFT 0.21 (``peft/tuners/ia3/layer.py``): a learned vector scales a module's output,
or its input for ``feedforward_modules``.

One layer's array: ``ia3_l (out,)`` (PEFT ``[out, 1]``) or, feedforward, ``ia3_l (in,)`` (PEFT
``[1, in]``; a conv's ``in`` is its channel count). Merge multiplies the weight's output columns
(and the bias) or input rows; unmerge divides by ``l + 1e-8`` as PEFT does. Several active IA3
adapters multiply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from .. import _torch_layout as L, paths as P
from ..config import AdapterConfig, check_bool, fail, module_names, regex_field
from ..errors import ConfigError, ShapeError, UnsupportedModuleError
from ..layout import Layout
from ._combine import CombineCall, first_spec, flat_layers, store
from .base import DERIVED, IN, OUT, Spec, one_value, spec_fields

EPS = 1e-8


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)^3: learned vectors scaling a module's output (or its input, for feedforward modules).

    When `target_modules` and `feedforward_modules` are both lists, every feedforward name must be
    one of the target names (PEFT's rule: a plain set inclusion, not a match).

    Attributes:
      (shared: common)
      feedforward_modules: the targeted modules treated as feedforward: their input is scaled
        (``ia3_l`` of size ``in``) instead of their output; a regex or a list of names, a subset of
        ``target_modules`` when both are lists. ``None``: none.
      fan_in_fan_out: (shared)
      init_ia3_weights: ``True``: the vectors start at 1 (a no-op); ``False``: random normal.

    Example:

      >>> IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]).feedforward_modules
      ('wo',)
    """

    peft_type: ClassVar[str] = "IA3"
    method: ClassVar[str] = "ia3"

    feedforward_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = regex_field(
            "feedforward_modules",
            module_names("feedforward_modules", self.feedforward_modules, empty_ok=True),
        )
        self._set("feedforward_modules", ff)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_ia3_weights", self.init_ia3_weights)
        targets = self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise fail(
                "feedforward_modules",
                list(ff),
                f"must be a subset of `target_modules` ({list(targets)}); "
                f"missing {sorted(set(ff) - set(targets))}.",
            )

    def is_feedforward(self, path: str) -> bool:
        return P.suffix_match(path, self.feedforward_modules, "feedforward_modules")

    def module_spec(self, path, layout, shape, mask):
        return IA3Spec(
            **spec_fields(layout, shape, mask, 1.0),
            feedforward=self.is_feedforward(path),
            init_weights=self.init_ia3_weights,
        )

    def check_module(self, peft_path, spec):
        if spec.feedforward != self.is_feedforward(peft_path):
            raise ConfigError(
                f"`config.feedforward_modules` disagrees with the adapter on `{peft_path}`."
            )

    def narrowed_fields(self, peft_paths):
        ff = [m for m, paths in peft_paths.items() if any(self.is_feedforward(p) for p in paths)]
        return {"feedforward_modules": f"(?:{P.exact_regex(ff)})" if ff else None}

    @classmethod
    def from_specs(cls, entries, common):
        ff = sorted({e.peft_path for e in entries if e.spec.feedforward}) or None
        init = one_value(entries, "init_ia3_weights", lambda s: s.init_weights)
        return cls(**common, feedforward_modules=ff, init_ia3_weights=init)


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

    def sharding_roles(self):
        """The vector scales the output features (the input features, feedforward; a conv's
        input channels), so it takes that axis's sharding."""
        if not self.feedforward:
            return {"ia3_l": (OUT,)}
        conv = self.layout.kind == "conv"
        return {"ia3_l": (len(self.layout.spatial(self.shape)),) if conv else (IN,)}

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

    def file_rules(self):
        nsp = len(self.layout.spatial(self.shape))
        if self.layout.kind == "conv":
            rule = L.conv_vector(nsp)
        else:
            rule = L.ROW if self.feedforward else L.COLUMN
        return {"ia3_l": ("ia3_l", rule)}

    def bias_companion(self, bias_shape, owner):
        if self.feedforward:
            return None
        return IA3BiasSpec(
            layout=Layout("dense", stack=self.layout.stack),
            shape=tuple(bias_shape),
            scaling=self.scaling,
            owner=owner,
        )

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

    method: ClassVar[str] = "ia3"
    role: ClassVar[str] = DERIVED
    factored: ClassVar[bool] = False

    def factor(self, owner_spec: IA3Spec, owner_arrays):
        """The factor the bias is multiplied by: the owner's per-output vector (per layer for a
        stacked weight: its own ``ia3_l``, or ones where ``layers_to_transform`` left it out)."""
        if not owner_spec.layout.stack:
            return owner_spec.bias_vector(owner_arrays, owner_spec.scaling[0])
        full = owner_spec.expand(owner_arrays)["ia3_l"]
        flat = {"ia3_l": full.reshape(owner_spec.n_layers, -1)}
        vec = jax.vmap(owner_spec.bias_vector)(flat, owner_spec.scale_array())
        return vec.reshape(full.shape)

    def derived_value(self, b, owner_spec, owner_arrays, undo: bool = False):
        """The bias with the owner's adapter folded in (``undo``: taken out, PEFT's ``+ eps``)."""
        f = self.factor(owner_spec, owner_arrays).reshape(b.shape)
        b32 = b.astype(jnp.float32)
        return b32 / (f + EPS) if undo else b32 * f

    def init_layer(self, key, w_layer, scale, dtype):
        return {}

    def describe(self) -> str:
        return f"ia3 bias (of {self.owner})"


# ------------------------------------------------------------------------ add_weighted_adapter


def combine_ia3(call: CombineCall) -> dict[int, tuple[Spec, dict]]:
    """IA3's combiner (`Method.combine`; PEFT's ``IA3Model.add_weighted_adapter``): on each
    module the weighted sum ``l = sum_i w_i l_i`` (the combination arguments are unused)."""
    _check_ia3(call.sites)
    return {s.leaf.index: _ia3_leaf(s, call.adapters, call.weights) for s in call.sites}


def _check_ia3(sites) -> None:
    for s in sites:
        node = s.leaf.value
        specs = {n: node.spec(n) for _, n in s.present}
        ff = {n: sp.feedforward for n, sp in specs.items()}
        if len(set(ff.values())) > 1:
            raise ConfigError(
                f"module `{s.leaf.module}`: IA3 adapters {sorted(ff)} disagree on whether it is a "
                f"feedforward module ({ff}); their vectors scale different axes."
            )
        if len({sp.layout for sp in specs.values()}) > 1:
            raise ShapeError(f"module `{s.leaf.module}`: the adapters' layouts differ: {specs}.")


def _ia3_leaf(site, adapters, weights):
    node = site.leaf.value
    specs = [node.spec(n) for _, n in site.present]
    spec0 = specs[0]
    n = spec0.n_layers
    total = None
    for sp, (i, nm) in zip(specs, site.present):
        v = flat_layers(sp, node.arrays[nm], n)["ia3_l"]
        term = v * jnp.asarray(weights[i], jnp.float32).astype(v.dtype)
        total = term if total is None else total + term
    layers = sorted(set().union(*(sp.stored_layers for sp in specs)))
    on = set(layers)
    lay = None if not spec0.layout.stack or len(layers) == n else tuple(layers)
    scaling = tuple(1.0 if i in on else 0.0 for i in range(n)) if spec0.layout.stack else (1.0,)
    new = IA3Spec(
        layout=spec0.layout,
        shape=spec0.shape,
        scaling=scaling,
        layers=lay,
        feedforward=spec0.feedforward,
        init_weights=first_spec(adapters, node, specs).init_weights,
    )
    return new, store(new, {"ia3_l": total}, lay)
