"""What every method provides, and the machinery that runs a per-layer rule over stacked layers.

A method's *spec* is a frozen, hashable dataclass of static metadata (rank, scaling, layout...)
kept in the pytree's aux data; the adapter's arrays are pytree children. Specs hold no arrays.

All per-layer rules work on one layer's weight (stack axes removed) and receive ``scale``, a
scalar that may be traced: it is the layer's scaling factor, and ``0`` for a layer excluded by
``layers_to_transform`` (the rule then must leave that layer's weight exactly unchanged).

**Stacked weights with ``layers_to_transform`` are stored compact.** On a stacked (scanned)
weight of ``n`` layer slices (the stack axes flattened in row-major order, any ``layout.stack``)
whose adapter covers only some slices, `Spec.layers` lists them (sorted flat indices, ``None``
= every slice) and each adapter array has one leading axis of ``k = len(layers)`` slices instead
of the stack axes: excluded layers have no arrays, no gradient, no optimizer state and no
parameter count (PEFT's count). ``scaling`` stays one factor per layer of the *full* stack
(``0`` on the excluded ones), so code that reads it is unchanged. Who needs what:

* `init` initialises only the stored slices, each with the same per-layer key (``split(key, n)
  [i]``) and so the same values as a full stack would give it.
* `merge` / `unmerge` (`_over_layers`) gather the stored slices of the base, run the layer rule
  on those ``k`` only and scatter them back: the excluded slices are not touched at all.
* `expand` gives the full-stack arrays (stack axes leading) for consumers that walk every layer:
  `pj.apply`'s scan ``xs`` (the scan then sees ``n`` slices, its logic unchanged) and the IA3
  bias factor. Excluded slices get the method's identity values (`identity`: zeros, or ones for
  IA3 vectors); their scale is ``0`` and every rule treats scale ``0`` as the identity (LoRA,
  LoHa, LoKr multiply by it; DoRA and IA3 guard with ``jnp.where(scale != 0, ...)``). It is a
  scatter of adapter-sized arrays, so its gradient is a gather: only the stored slices get one.
  Inside the scan the excluded layers still run the adapter's (tiny) factored matmuls with scale
  ``0``: skipping them would need a ``cond`` per scan step, which costs more than it saves; the
  base work, the gradients and the optimizer state are what scale with ``k``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import paths as P
from .._torch_layout import Rule
from ..errors import ConfigError, ShapeError
from ..layout import Layout

Arrays = dict[str, Any]

#: `Spec.role` values. ``delta``: the adapter changes its weight through the method's rules.
#: ``copy``: a copy of the leaf that replaces it while active (LN tuning, ``modules_to_save``).
#: ``derived``: no arrays of its own; the leaf follows the adapter of a sibling leaf (`owner`).
#: ``prompt``: a prompt-learning adapter (`peftjax.methods.prompt`): its arrays act on the
#: activations (virtual tokens, a KV prefix, a gated attention), never on the weight it sits on,
#: which stays the base value; it cannot merge.
DELTA, COPY, DERIVED, PROMPT = "delta", "copy", "derived", "prompt"

#: Axis roles of `Spec.sharding_roles` (see `peftjax.sharding`): the base weight's matrix-view
#: input / output axis, and the adapter rank (replicated unless a ``rank_axis`` is asked for).
#: An ``int`` role is that axis of the base weight's layer; ``None`` is replicated.
IN, OUT, RANK = "in", "out", "rank"


def kaiming_uniform(key, shape, fan_in: int, dtype=jnp.float32):
    """torch's ``kaiming_uniform_(w, a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one adapter on one weight leaf.

    Attributes:
      layout: how the base weight is read as a matrix.
      shape: the base weight's shape.
      scaling: one scaling factor per stacked layer (a 1-tuple when not stacked); ``0`` turns a
        layer off (``layers_to_transform``).
      carries_base: the adapter brings the module's base weights with it (HF PEFT's
        ``save_embedding_layers``: an adapter file with ``<module>.base_layer.weight`` keys, made
        when a targeted embedding / ``lm_head`` was resized); `save_pretrained` writes them back.
      layers: for a stacked weight, the (flat, sorted) layer slices that carry the adapter, whose
        arrays are then stored compact with a leading axis of ``len(layers)`` (module
        docstring); ``None``: every slice, arrays with the stack axes leading. A tuple naming
        every slice is normalised to ``None``.
      initial_scaling: the `scaling` the adapter was made with (PEFT's ``alpha / r`` per layer),
        kept once `pj.set_scale` / `pj.scale_layer` / `pj.unscale_layer` change `scaling` (they
        scale and reset relative to it); ``None``: `scaling` is still the initial one.
    """

    layout: Layout
    shape: tuple[int, ...]
    scaling: tuple[float, ...]
    carries_base: bool = dataclasses.field(default=False, kw_only=True)
    layers: tuple[int, ...] | None = dataclasses.field(default=None, kw_only=True)
    initial_scaling: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)

    method: ClassVar[str] = "?"
    #: see `DELTA`, `COPY`, `DERIVED`
    role: ClassVar[str] = DELTA
    #: arrays that are caches, not parameters (not counted, as PEFT counts)
    buffers: ClassVar[frozenset[str]] = frozenset()
    #: arrays that never train: `partition` keeps them in the frozen half (no gradient, no
    #: optimizer state)
    frozen_arrays: ClassVar[frozenset[str]] = frozenset()
    #: arrays that live on one holder leaf and serve every module of the adapter
    #: (`shared_holder`)
    shared: ClassVar[frozenset[str]] = frozenset()
    #: the forward rule reads the base output ``y`` and so must come first in a chain
    needs_base_output: ClassVar[bool] = False
    #: `pj.hotswap` can swap another adapter's arrays into this spec's (PEFT's hotswap: LoRA
    #: only; the rank is padded by `pj.prepare_hotswap`, the scale folded into ``lora_B``)
    hotswap: ClassVar[bool] = False
    #: rule has a factored matrix forward (`linear_forward`); otherwise the delta is built
    factored: ClassVar[bool] = True
    #: fill value of an array's excluded layer slices in `expand` (default ``0``)
    identity: ClassVar[dict[str, float]] = {}

    def __post_init__(self):
        if self.layers is None:
            return
        layers = tuple(int(i) for i in self.layers)
        n = self.n_layers
        if (
            not self.layout.stack
            or not layers
            or list(layers) != sorted(set(layers))
            or layers[0] < 0
            or layers[-1] >= n
        ):
            raise ShapeError(
                f"spec `layers={self.layers!r}`: expected sorted, distinct layer indices of a "
                f"stacked weight of {n} layer slice(s) (shape {self.shape}, {self.layout})."
            )
        on = set(layers)
        if any(s != 0 for i, s in enumerate(self.scaling) if i not in on):
            raise ShapeError(
                f"spec `layers={layers}`: a layer outside them has a nonzero scaling "
                f"{self.scaling}; excluded layer slices have scaling 0."
            )
        object.__setattr__(self, "layers", None if len(layers) == n else layers)

    # ---- to implement -------------------------------------------------------------------
    def init_layer(self, key, w_layer, scale, dtype) -> Arrays:
        """One layer's arrays, initialised as PEFT does (``w_layer`` is the base weight)."""
        raise NotImplementedError

    def delta_matrix(self, arrays: Arrays, scale):
        """One layer's float32 delta on the ``(in, out)`` matrix view (additive methods)."""
        raise NotImplementedError

    def delta_layer(self, arrays: Arrays, scale):
        """One layer's float32 delta in the base weight's own layer shape."""
        return self.from_matrix(self.delta_matrix(arrays, scale))

    def merge_layer(self, w32, arrays: Arrays, scale):
        """Fold the adapter into one layer's float32 weight; returns ``(w32, arrays)``."""
        return w32 + self.delta_layer(arrays, scale), arrays

    def unmerge_layer(self, w32, arrays: Arrays, scale):
        return w32 - self.delta_layer(arrays, scale), arrays

    def linear_forward(self, x2, y2, arrays: Arrays, w2, scale, rng):
        """Adapted output of ``x2 @ W`` on the matrix view: ``x2 (..., in)``, ``y2 (..., out)``.

        ``y2`` is the output so far; ``w2`` is the base matrix (``None`` unless
        `needs_base_output` or the method asks for it); ``rng`` is ``None`` outside training.
        """
        raise NotImplementedError

    # ---- optional: files and special forwards (the generic code asks, the method answers) ---
    def file_rules(self) -> dict[str, tuple[str, Rule]]:
        """``{array name: (PEFT key suffix, torch layout rule)}`` of one layer's arrays; empty
        for a spec that has no PEFT format."""
        return {}

    def fusable(self, training: bool) -> bool:
        """Whether, when not differentiated, the forward may apply ``x @ (W + dW)`` with the
        delta built once (`delta_layer`) instead of the factored rule. ``training``: an rng is
        given (dropout active)."""
        return False

    @property
    def conv_factored(self) -> bool:
        """Has a factored forward on a conv kernel (`conv_forward`)."""
        return False

    def conv_forward(self, conv, x, y, arrays: Arrays, scale, rng, feature_axis: int):
        """``y`` (the base conv output) plus the adapter, given ``conv(x, kernel)`` that runs
        the module's own convolution on another kernel (``feature_axis`` of ``y`` holds the
        output features)."""
        raise NotImplementedError

    @property
    def gather_factored(self) -> bool:
        """Has a factored forward on an embedding lookup (`gathered_forward`)."""
        return False

    def gathered_forward(self, gather, y, arrays: Arrays, scale):
        """``y`` (the looked-up rows of the base table) plus the adapter, given
        ``gather(table)`` that looks up the same ids in another ``(vocab, n)`` table."""
        raise NotImplementedError

    # ---- mixed-adapter batches (`pj.apply(fn, adapter_ids=...)`) ------------------------------
    #: spec fields that may differ among adapters batched together at one module (the
    #: scalings always may: they enter the forward as arrays)
    mixed_free: ClassVar[frozenset[str]] = frozenset()

    #: `mixed_forward` leaves the rows of the neutral slot exactly as given (LoRA adds an exact
    #: zero there), so the generic code need not select them back
    mixed_neutral_exact: ClassVar[bool] = False

    def mixed_key(self) -> tuple:
        """Specs with equal keys are batched as one group: their arrays stacked (after
        `mixed_pad`) and each example's slice picked by its adapter id."""
        skip = {"scaling", "initial_scaling", "layers", *self.mixed_free}
        fields = dataclasses.fields(self)
        kept = tuple((f.name, getattr(self, f.name)) for f in fields if f.name not in skip)
        return (type(self), *kept)

    def mixed_pad(self, arrays: Arrays, members: tuple[Spec, ...]) -> Arrays:
        """``arrays`` (full-stack) brought to the shapes shared by the group ``members``
        (LoRA pads ranks with zeros); the default keeps them."""
        return arrays

    def mixed_neutral(self, arrays: Arrays) -> Arrays:
        """Arrays that, with scale ``0``, leave the output as the base's: the slot of examples
        that run the base model (or an adapter absent at this module)."""
        return {k: jnp.zeros_like(v) for k, v in arrays.items()}

    def mixed_forward(self, x3, y3, stack: Arrays, slot, w2, scale, rng):
        """The forward of a mixed batch on ``x3 (batch, tokens, in)``, ``y3 (batch, tokens,
        out)``: example ``i`` runs the group's adapter ``slot[i]`` (``stack`` holds the group's
        arrays stacked on axis 0, ``scale`` its scales). Default: `linear_forward` batched over
        the examples with each example's arrays gathered (a batched rank-``r`` matmul for LoRA:
        one pass, not one per adapter)."""
        arrays = {k: jnp.take(v, slot, axis=0) for k, v in stack.items()}
        s = jnp.take(scale, slot)
        keys = None if rng is None else jax.random.split(rng, slot.shape[0])

        def one(x, y, a, si, k):
            return self.linear_forward(x, y, a, w2, si, k)

        return jax.vmap(one)(x3, y3, arrays, s, keys)

    def mixed_gathered_forward(self, gather, y, stack: Arrays, slot, scale):
        """`gathered_forward` for a mixed batch (``y (batch, ..., n)``); ``None``: the method
        has no factored lookup."""
        return None

    def constrain(self, arrays: Arrays) -> Arrays:
        """The arrays with the method's constraint applied (PEFT rewrites them so in place
        before every forward: COFT's projection); identity for most methods. `pj.constrain`
        applies it to a tree, `save_pretrained` writes constrained arrays."""
        return arrays

    def sharding_roles(self) -> dict[str, tuple]:
        """How each adapter array follows the base weight's sharding on a mesh: ``{array: one
        role per layer axis}`` (stack axes are prepended by `peftjax.sharding`), each role
        `IN` / `OUT` (the matrix view's axes), `RANK`, an ``int`` (that axis of the base
        weight's layer) or ``None`` (replicated). Arrays not listed are replicated; so is
        everything by default."""
        return {}

    def shared_holder(self) -> str | None:
        """For a method whose adapter shares arrays across modules (VeRA's projections): the
        module path of the one leaf that holds them (``None`` on that leaf itself and for
        methods without shared arrays). Generic code passes the holder's `shared` arrays to
        this spec's rules beside its own."""
        return None

    def shared_file_keys(self) -> dict[str, tuple[str, Rule]]:
        """``{array: (full file key, rule)}`` of shared arrays this (holder) spec writes once
        per adapter, outside any module path (VeRA's ``base_model.vera_A``); `Method.
        shared_keys` lists the keys so that loading recognises them."""
        return {}

    def bias_companion(self, bias_shape: tuple[int, ...], owner: str) -> Spec | None:
        """A `DERIVED` spec for the module's bias leaf when the method also changes the bias
        (IA3 on outputs), else ``None``."""
        return None

    def file_parameter(self) -> tuple[str, int] | None:
        """For an adapter on a parameter targeted by PEFT's ``target_parameters`` (LoRA's
        ``lora.ParamWrapper``): ``(PEFT parameter path, nesting)``, e.g.
        ``("mlp.experts.gate_up_proj", 1)``. PEFT stores it under the parameter's module
        (``mlp.experts``) with ``.base_layer`` once per wrapper around it; the stack axes are
        the parameter's own (experts), written whole, one tensor per array (`file_rules` map
        the whole arrays). ``None`` (the default): the leaf's module, one PEFT module per
        stacked layer."""
        return None

    @property
    def supports_lora_conversion(self) -> bool:
        """PEFT's ``supports_lora_conversion``: the adapter's effect is ``W + delta`` with a
        delta that does not depend on ``W`` (`delta_matrix`), on a weight PEFT converts (a
        Linear layer), so `peftjax.convert_to_lora` can approximate it by a truncated SVD."""
        return False

    # ---- shared --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return math.prod(self.layout.stack_shape(self.shape))

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.layout.layer_shape(self.shape)

    @property
    def in_out(self) -> tuple[int, int]:
        return self.layout.in_out(self.shape)

    @property
    def stored_layers(self) -> tuple[int, ...]:
        """Flat indices of the layer slices that have arrays (all of them unless compact)."""
        return tuple(range(self.n_layers)) if self.layers is None else self.layers

    @property
    def compact(self) -> bool:
        """The arrays hold only the `layers` slices, on one leading axis."""
        return self.layers is not None

    def scale_array(self):
        """The scaling of every layer of the full stack, flat ``(n,)``."""
        return jnp.asarray(np.asarray(self.scaling, np.float32))

    def stored_scales(self):
        """The scaling of the stored slices, flat ``(k,)``."""
        return jnp.asarray(np.asarray([self.scaling[i] for i in self.stored_layers], np.float32))

    def expand(self, arrays: Arrays) -> Arrays:
        """Compact arrays as full-stack arrays (stack axes leading; excluded slices hold
        `identity` values); anything else is returned as it is. Differentiable: a scatter, whose
        gradient reaches only the stored slices."""
        if not self.compact:
            return arrays
        stack, idx = self.layout.stack_shape(self.shape), np.asarray(self.layers)
        out = {}
        for name, v in arrays.items():
            full = jnp.full((self.n_layers, *v.shape[1:]), self.identity.get(name, 0), v.dtype)
            full = full.at[idx].set(v, indices_are_sorted=True, unique_indices=True)
            out[name] = full.reshape(stack + v.shape[1:])
        return out

    def layer_arrays(self, arrays: Arrays, i: int) -> Arrays:
        """The arrays of layer slice ``i`` (a flat index into the full stack; must be stored)."""
        if not self.layout.stack:
            return arrays
        j = self.stored_layers.index(i)
        st = 1 if self.compact else self.layout.stack
        return {k: v.reshape((-1, *v.shape[st:]))[j] for k, v in arrays.items()}

    def describe(self) -> str:
        return self.method

    def init(self, key, base, dtype=jnp.float32) -> Arrays:
        """Arrays of every stored layer slice (stack axes leading, or one compact axis), from
        the base weight; layer ``i`` is initialised with ``split(key, n)[i]`` either way."""
        stack = self.layout.stack_shape(self.shape)
        w32 = jnp.asarray(base, jnp.float32)
        if not stack:
            return self.init_layer(key, w32, jnp.float32(self.scaling[0]), dtype)
        n = self.n_layers
        keys = jax.random.split(key, n)
        flat_w = w32.reshape((n,) + self.layer_shape)
        fn = lambda k, w, s: self.init_layer(k, w, s, dtype)
        if self.compact:
            idx = np.asarray(self.layers)
            return jax.vmap(fn)(keys[idx], flat_w[idx], self.stored_scales())
        out = jax.vmap(fn)(keys, flat_w, self.scale_array())
        return {k: v.reshape(stack + v.shape[1:]) for k, v in out.items()}

    def _over_layers(self, fn, w, arrays: Arrays):
        """Run ``fn(w_layer, arrays_layer, scale) -> (w_layer, arrays_layer)`` on each stored
        layer; the base slices of the excluded layers (compact storage) are left as they are."""
        stack = self.layout.stack_shape(self.shape)
        if not stack:
            return fn(w, arrays, jnp.float32(self.scaling[0]))
        n = self.n_layers
        flat_w = w.reshape((n,) + w.shape[len(stack) :])
        if self.compact:
            idx = np.asarray(self.layers)
            out_w, out_a = jax.vmap(fn)(flat_w[idx], arrays, self.stored_scales())
            flat_w = flat_w.at[idx].set(out_w, indices_are_sorted=True, unique_indices=True)
            return flat_w.reshape(w.shape), out_a
        flat_a = {k: v.reshape((n,) + v.shape[len(stack) :]) for k, v in arrays.items()}
        out_w, out_a = jax.vmap(fn)(flat_w, flat_a, self.scale_array())
        return out_w.reshape(w.shape), {k: v.reshape(stack + v.shape[1:]) for k, v in out_a.items()}

    def merge(self, w32, arrays: Arrays):
        return self._over_layers(self.merge_layer, w32, arrays)

    def unmerge(self, w32, arrays: Arrays):
        return self._over_layers(self.unmerge_layer, w32, arrays)

    def parameter_count(self, arrays: Arrays | None) -> int:
        """Parameters of the stored arrays as PEFT counts them (`buffers` are not)."""
        return sum(
            int(np.prod(getattr(v, "shape", ()))) if v is not None else 0
            for k, v in (arrays or {}).items()
            if k not in self.buffers
        )

    # helpers for the matrix view of one layer
    def to_matrix(self, w_layer):
        return self.layout.to_matrix(w_layer)

    def from_matrix(self, m):
        return self.layout.from_matrix(m, self.layer_shape)


def dropout(x, rate: float, rng):
    """Inverted dropout as torch's ``nn.Dropout`` (off when ``rng`` is None or rate is 0)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def rank_dropout_mask(rng, n: int, rate: float, rescale: bool):
    """LyCORIS rank dropout: keep each output unit with prob ``1 - rate`` (``rand > rate``)."""
    keep = (jax.random.uniform(rng, (n,)) > rate).astype(jnp.float32)
    if rescale:
        keep = keep / jnp.maximum(keep.mean(), 1e-12)
    return keep


def lycoris_dropout(y_delta, rng, rank_dropout: float, module_dropout: float, rescale: bool):
    """Apply rank dropout (per output unit) and module dropout (whole adapter) to ``x @ dW``."""
    if rng is None:
        return y_delta
    k1, k2 = jax.random.split(rng)
    if rank_dropout > 0:
        y_delta = y_delta * rank_dropout_mask(k1, y_delta.shape[-1], rank_dropout, rescale).astype(
            y_delta.dtype
        )
    if module_dropout > 0:
        keep = jax.random.uniform(k2, ()) >= module_dropout
        y_delta = jnp.where(keep, y_delta, jnp.zeros_like(y_delta))
    return y_delta


# ------------------------------------------------------------------------------------ configs


def spec_fields(layout: Layout, shape, mask, s: float) -> dict[str, Any]:
    """The `Spec` fields every method shares, for one weight with per-layer ``mask`` (``None``:
    every layer) and the module's scale ``s``: a stacked weight with some slices excluded stores
    only the others (compact, module docstring)."""
    nl = int(np.prod(layout.stack_shape(shape))) if layout.stack else 1
    on = mask if mask is not None else [True] * nl
    layers = None if mask is None or all(mask) else tuple(i for i, m in enumerate(mask) if m)
    return dict(
        layout=layout,
        shape=tuple(shape),
        scaling=tuple(float(s) if m else 0.0 for m in on),
        layers=layers,
    )


class RankedConfig:
    """Config mixin of methods with a rank ``r``, a scale ``alpha`` (field `alpha_field`) and
    PEFT's ``rank_pattern`` / ``alpha_pattern``; `scaling` is theirs."""

    alpha_field: ClassVar[str] = "alpha"

    if TYPE_CHECKING:  # the fields and scale of the method configs that mix this in
        r: int
        rank_pattern: Any
        alpha_pattern: Any

        def scaling(self, r: int, alpha: float) -> float: ...

    def rank_alpha(self, path: str) -> tuple[int, int | float]:
        r = P.get_pattern_value(path, self.rank_pattern, self.r)
        alpha = P.get_pattern_value(
            path, self.alpha_pattern, getattr(self, self.alpha_field), "alpha_pattern"
        )
        return int(r), alpha

    def module_scale(self, path: str) -> tuple[int, float]:
        """``(r, scaling)`` of module ``path``."""
        r, alpha = self.rank_alpha(path)
        return r, self.scaling(r, alpha)


def one_value(entries: list, field: str, get) -> Any:
    """The one value ``get(spec)`` of every entry; `ConfigError` when they disagree."""
    vals = {get(e.spec) for e in entries}
    if len(vals) > 1:
        raise ConfigError(
            f"the adapter's modules disagree on `{field}` ({sorted(map(repr, vals))}), which an "
            "adapter_config.json holds once; pass `config=` to `save_pretrained`."
        )
    return vals.pop()


def _alpha_of(scale: float, r: int, rslora: bool = False) -> int | float:
    a = scale * (math.sqrt(r) if rslora else r)
    ra = round(a)
    return int(ra) if abs(a - ra) <= 1e-9 * max(1.0, abs(a)) else a


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def ranked_fields(entries: list, alpha_field: str, try_rslora: bool = False) -> dict[str, Any]:
    """``r``, alpha, ``rank_pattern`` and ``alpha_pattern`` (and ``use_rslora`` when
    ``try_rslora``) that give every entry its rank and scaling.

    ``r`` and alpha are the most common values; modules that differ get exact-path pattern
    entries. Alpha is ``scaling * r``, or ``scaling * sqrt(r)`` with ``use_rslora`` when that
    gives whole numbers and fewer patterns (both give exactly the adapter's scalings)."""
    rank = {e.peft_path: e.spec.r for e in entries}

    def alphas(rslora: bool) -> dict[str, int | float]:
        return {
            e.peft_path: _alpha_of(e.spec.scaling[e.layer or 0], e.spec.r, rslora) for e in entries
        }

    def untidy(a: dict) -> tuple[int, int]:
        return sum(isinstance(v, float) for v in a.values()), len(set(a.values()))

    alpha, rslora = alphas(False), False
    if try_rslora and untidy(alphas(True)) < untidy(alpha):
        alpha, rslora = alphas(True), True  # e.g. an rsLoRA adapter: whole alphas, fewer patterns
    r0, a0 = _most_common(list(rank.values())), _most_common(list(alpha.values()))
    out = {
        "r": r0,
        alpha_field: a0,
        "rank_pattern": {k: v for k, v in sorted(rank.items()) if v != r0},
        "alpha_pattern": {k: v for k, v in sorted(alpha.items()) if v != a0},
    }
    if try_rslora:
        out["use_rslora"] = rslora
    return out
