"""Adapter arithmetic: a new adapter combined from existing ones, as HF PEFT 0.21's
``LoraModel.add_weighted_adapter`` (``peft/tuners/lora/model.py``, ``peft/utils/merge_utils.py``)
and ``IA3Model.add_weighted_adapter`` (``peft/tuners/ia3/model.py``).

LoRA, per module (``w_i`` the weights, ``s_i`` the adapters' scalings, Flax orientation
``A (in, r)``, ``B (r, out)``):

* ``cat``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` (rank axis), ``B = [B_1; B_2; ...]``, zero
  padded to the new rank ``sum(r_i)``: the delta is exactly ``sum_i w_i s_i A_i B_i``.
* factor-wise (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the
  ``A_i`` are combined with weights ``sign(w_i s_i) sqrt(|w_i s_i|)`` and the ``B_i`` with
  ``sqrt(|w_i s_i|)`` by PEFT's merge rule of that name (task arithmetic, TIES, DARE, magnitude
  pruning), separately; every adapter needs the same rank, which is the new one.
* ``*svd`` (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the deltas ``s_i A_i B_i`` are combined by that rule (``svd``: task
  arithmetic), and the result ``D`` is factored by a truncated SVD of the torch-layout ``D^T =
  U S V^T``: ``B = (U S)[:, :k]^T``, ``A = V[:, :k]`` with ``k = svd_rank`` (default: the largest
  rank of the adapters), optionally clamped at the ``svd_clamp`` quantile of the factors' values.
* one adapter: always ``linear`` (PEFT's rule).

The new adapter has scaling 1 everywhere (PEFT: ``r = lora_alpha = new rank``) and the other
settings of the first adapter (dropout, init); it is not active (the active set is unchanged)
and is trainable unless the first adapter is frozen (PEFT freezes it until ``set_adapter``;
an inactive peftjax adapter gets no gradient anyway). It is a plain LoRA adapter afterwards:
`pj.apply`, `pj.merge`, `pj.save_pretrained` treat it like any other.

IA3: ``l = sum_i w_i l_i`` on each module.

Where peftjax differs from PEFT, deliberately:

* The new adapter sits exactly on the modules (and stacked layer slices) where at least one of
  the combined adapters is. PEFT re-injects by the union of the configs' ``target_modules`` with
  the first config's ``layers_to_transform`` / ``exclude_modules``, and raises where that finds a
  module none of them adapts; wherever PEFT succeeds the modules are the same.
* The adapters' ranks are read from the tree (the largest rank of each adapter's modules), not
  from its config's ``r`` / ``rank_pattern``: a pattern rank that matches no module does not
  count here.
* An ``*svd`` type on a module smaller than the new rank gives that module rank ``min(in,
  out)`` (PEFT's ``svd_full_matrices=True`` makes mismatched factors there); `save_pretrained`
  writes such ranks as ``rank_pattern`` / ``alpha_pattern``.
* Refused where PEFT gives a result that is not a combination: DoRA adapters (PEFT combines
  the LoRA factors, drops the magnitudes and gives the new adapter the magnitude of its own
  random initialisation), ``adapter_name`` already present (PEFT silently does nothing),
  ``density`` outside ``[0, 1]``, and ``density=0`` with DARE (PEFT divides by it: NaN).
* PEFT copies ``use_rslora`` from the first config, so with rsLoRA its new adapter is scaled by
  ``sqrt(new rank)``; peftjax's specs record scalings, not ``use_rslora``, and the new adapter's
  delta is exactly the combination (scaling 1).
* DARE's random masks come from ``key`` (a JAX PRNG key), so they are not torch's.
* A stacked (scanned) weight is combined layer by layer; a layer slice where an adapter is
  absent counts as a zero tensor, which every rule treats as PEFT treats an absent adapter,
  except that ``cat`` then keeps a zero block in that adapter's place (same delta).

Everything runs on `jax.numpy`, so the call works under `jax.jit` (weights may even be traced);
all checks happen first, on static information, and name the adapter or module at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import group_modules, rebuild, walk
from .errors import AdapterNameError, ArgumentTypeError, ConfigError, ShapeError
from .layout import Layout
from .methods import COPY, DELTA, DERIVED, modules_to_save_spec
from .methods.ia3 import IA3Spec
from .methods.lora import LoraSpec
from .node import Adapted, is_adapted
from .sharding import place
from .transforms import _key_arg, adapter_names, check_names, names_arg

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

#: PEFT's ``combination_type`` values.
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSITY = frozenset(COMBINATION_TYPES) - {"svd", "linear", "cat"}
_SIGN_METHODS = ("total", "frequency")
#: the rule each type reduces to when ``density >= 1`` (PEFT's ``prune`` then does nothing)
_UNPRUNED = {
    "dare_linear": "linear",
    "magnitude_prune": "linear",
    "dare_ties": "ties",
    "dare_linear_svd": "svd",
    "magnitude_prune_svd": "svd",
    "dare_ties_svd": "ties_svd",
}
_METHODS = ("lora", "ia3")


def _rule(combination_type: str) -> str:
    """The merge rule of a combination type (``svd`` is task arithmetic, ``linear``)."""
    if combination_type == "svd":
        return "linear"
    return (
        combination_type[: -len("_svd")] if combination_type.endswith("_svd") else combination_type
    )


# ------------------------------------------------------------------------ PEFT's merge rules


def _magnitude_prune(t, density: float):
    """PEFT's ``magnitude_based_pruning``: keep the ``int(density * t.size)`` largest |values|."""
    k = int(density * t.size)
    flat = t.reshape(-1)
    if k == 0:
        return jnp.zeros_like(t)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, t.dtype).at[idx].set(1)
    return (flat * mask).reshape(t.shape)


def _random_prune(t, density: float, key):
    """PEFT's ``random_pruning`` with rescaling: keep each value with probability ``density``
    and divide the kept ones by it."""
    keep = jax.random.bernoulli(key, density, t.shape)
    return jnp.where(keep, t, jnp.zeros_like(t)) / jnp.asarray(density, t.dtype)


def _merge(rule: str, tensors, weights, density, sign_method: str, keys):
    """PEFT's ``task_arithmetic`` / ``ties`` / ``dare_linear`` / ``dare_ties`` /
    ``magnitude_prune`` of same-shape ``tensors`` with ``weights`` (one per tensor)."""
    if rule in ("ties", "magnitude_prune") and density < 1:
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties") and density < 1:
        tensors = [_random_prune(t, density, k) for t, k in zip(tensors, keys)]
    t = jnp.stack(tensors)
    w = jnp.asarray(weights, t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))
    if rule in ("ties", "dare_ties"):
        sign = jnp.sign(t)
        votes = t.sum(0) if sign_method == "total" else sign.sum(0)
        majority = jnp.where(votes >= 0, 1.0, -1.0).astype(t.dtype)
        mask = (sign == majority).astype(t.dtype)
        return (t * w * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)
    return (t * w).sum(0)


# ------------------------------------------------------------------------ argument checks


def _real(field: str, v, lo=None, hi=None) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (Real, np.integer, np.floating)):
        raise ArgumentTypeError(f"`{field}`: expected a real number, got {type(v).__name__} {v!r}.")
    f = float(v)
    if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None else ""
        raise ConfigError(f"`{field}`={v!r}: must be a finite number{rng}.")
    return f


def _weights_arg(weights, n: int, adapters) -> tuple[list, bool]:
    """``(weights, concrete)``: Python floats when every weight is concrete, else the values as
    given (traced scalars under `jax.jit`)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)):
        if not (isinstance(weights, jax.Array) and weights.ndim == 1):
            raise ArgumentTypeError(
                f"`weights`: expected a list of numbers (one per adapter), got "
                f"{type(weights).__name__} {weights!r}."
            )
    vals = list(weights)
    if len(vals) != n:
        raise ConfigError(
            f"`weights` has {len(vals)} value(s) but `adapters` names {n} ({list(adapters)}): "
            "give one weight per adapter."
        )
    concrete = True
    out: list[Any] = []  # floats, or traced scalars
    for i, w in enumerate(vals):
        if isinstance(w, jax.core.Tracer):
            if getattr(w, "shape", None) != () or not jnp.issubdtype(w.dtype, jnp.floating):
                raise ArgumentTypeError(f"`weights[{i}]`: expected a float scalar, got {w!r}.")
            concrete = False
            out.append(w)
            continue
        if isinstance(w, (jax.Array, np.ndarray)) and getattr(w, "shape", None) == ():
            w = w.item()
        out.append(_real(f"weights[{i}]", w))
    return out, concrete


def _check_args(
    params,
    adapters,
    weights,
    adapter_name,
    ct,
    svd_rank,
    svd_clamp,
    full,
    density,
    sign_method,
    key,
):
    adapters = names_arg(adapters, "adapters")
    if not adapters:
        raise AdapterNameError("`adapters`: name at least one adapter to combine.")
    check_names(params, adapters, "adapters")
    weights, concrete = _weights_arg(weights, len(adapters), adapters)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise AdapterNameError(f"`adapter_name` must be a non-empty str, got {adapter_name!r}.")
    if adapter_name in adapter_names(params):
        raise AdapterNameError(
            f"`adapter_name`: an adapter named {adapter_name!r} already exists (PEFT would "
            "silently keep it and do nothing); pick another name or `pj.delete` it first."
        )
    if ct not in COMBINATION_TYPES:
        raise ConfigError(
            f"`combination_type`={ct!r}: invalid; use one of {list(COMBINATION_TYPES)}."
        )
    if svd_rank is not None:
        if isinstance(svd_rank, (bool, np.bool_)) or not isinstance(svd_rank, (int, np.integer)):
            raise ArgumentTypeError(f"`svd_rank`: expected an int or None, got {svd_rank!r}.")
        if svd_rank <= 0:
            raise ConfigError(f"`svd_rank`={svd_rank!r}: must be a positive int (or None).")
    if svd_clamp is not None:
        _real("svd_clamp", svd_clamp, 0.0, 1.0)
    if not isinstance(full, (bool, np.bool_)):
        raise ArgumentTypeError(f"`svd_full_matrices`: expected a bool, got {full!r}.")
    if sign_method not in _SIGN_METHODS:
        raise ConfigError(
            f"`majority_sign_method`={sign_method!r}: use one of {list(_SIGN_METHODS)}."
        )
    if density is not None:
        density = _real("density", density)
    return adapters, weights, concrete, density, key


def _check_density(ct: str, density, key):
    """``(density, key)`` checked for the (effective) combination type."""
    if ct not in _DENSITY:
        return density, None
    if density is None:
        raise ConfigError(
            f"`density` is required for combination_type {ct!r}: the fraction of values to "
            "keep, a float in [0, 1]."
        )
    if not 0.0 <= density <= 1.0:
        raise ConfigError(
            f"`density`={density!r}: must be in [0, 1] (the fraction of values kept; PEFT does "
            "no pruning at 1)."
        )
    if ct.startswith("dare"):
        if density == 0.0:
            raise ConfigError(
                f"`density`=0 with combination_type {ct!r}: DARE rescales the kept values by "
                "1 / density (PEFT gives NaN); use a density in (0, 1]."
            )
        if key is None:
            raise ArgumentTypeError(
                f"combination_type {ct!r} drops values at random: pass `key=` (a JAX PRNG key, "
                "e.g. `jax.random.key(0)`)."
            )
        key = _key_arg(key)
    else:
        key = None
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            UserWarning,
            stacklevel=3,
        )
    return density, key


# ------------------------------------------------------------------------ what the tree holds


@dataclasses.dataclass
class _Site:
    """One weight leaf carrying some of the combined adapters."""

    leaf: object
    present: list[tuple[int, str]]  # (position in `adapters`, name), in `adapters` order


def _survey(leaves, adapters):
    """``(sites, copies, derived, method)``: the weight leaves carrying the adapters, the leaves
    with ``modules_to_save`` copies of them, the leaves with derived specs (IA3 biases) and the
    one method of all the adapters; a `ConfigError` naming the adapter otherwise."""
    methods: dict[str, set[str]] = {n: set() for n in adapters}
    sites, copies, derived = [], [], []
    for l in leaves:
        node = l.value
        if not is_adapted(node):
            continue
        here = [(i, n) for i, n in enumerate(adapters) if n in node.names]
        delta = []
        for i, n in here:
            spec = node.spec(n)
            if _is_copy(node, n):
                if not copies or copies[-1] is not l:
                    copies.append(l)
            elif spec.role == DERIVED:
                if not derived or derived[-1] is not l:
                    derived.append(l)
            else:  # DELTA, or a method of another kind (LN tuning's copies, prompts)
                methods[n].add(spec.method)
                if spec.role == DELTA:
                    delta.append((i, n))
        if delta:
            sites.append(_Site(l, delta))
    for n in adapters:
        bad = methods[n] - set(_METHODS)
        if bad:
            m = sorted(bad)[0]
            extra = (
                " (PEFT: AdaLoraModel does not support add_weighted_adapter)"
                if m == "adalora"
                else ""
            )
            raise ConfigError(
                f"adapter {n!r} is {m}: `add_weighted_adapter` combines LoRA adapters (PEFT's "
                f"`LoraModel.add_weighted_adapter`) and IA3 adapters (`IA3Model`'s) only{extra}."
            )
        if not methods[n]:
            raise ConfigError(f"adapter {n!r} adapts no weight here: there is nothing to combine.")
    kinds = {m for n in adapters for m in methods[n]}
    if len(kinds) > 1:
        which = {n: sorted(methods[n])[0] for n in adapters}
        raise ConfigError(
            f"`adapters` mix methods {which}: only adapters of one method can be combined."
        )
    return sites, copies, derived, kinds.pop()


def _is_copy(node, name: str) -> bool:
    """Adapter ``name`` has a ``modules_to_save`` copy of this leaf."""
    if name not in node.names:
        return False
    spec = node.spec(name)
    return spec.role == COPY and spec.method == "modules_to_save"


def _check_copies(copies, adapters) -> None:
    """PEFT's rule: two of the adapters may not both have a ``modules_to_save`` copy of one
    module."""
    for l in copies:
        mine = sorted({n for n in adapters if _is_copy(l.value, n)})
        if len(mine) > 1:
            raise ConfigError(
                f"Cannot add weighted adapters if they target the same module with "
                f"modules_to_save: adapters {mine} each have a copy of `{l.module}` ({l.name})."
            )


def _check_lora(sites, adapters, ct: str, svd_rank) -> int:
    """PEFT's `_check_add_weighted_adapter` rules for LoRA; the new rank."""
    ranks: dict[str, int] = {}
    for s in sites:
        node = s.leaf.value
        specs = [(n, node.spec(n)) for _, n in s.present]
        for n, spec in specs:
            if not isinstance(spec, LoraSpec):
                raise ConfigError(f"adapter {n!r} on `{s.leaf.module}` is not a LoRA adapter.")
            if spec.target_parameter is not None:
                raise ConfigError(
                    "add_weighted_adapter does not support targeting nn.Parameter (problematic "
                    f"adapter {n!r}: `target_parameters` entry {spec.target_parameter!r})."
                )
            if spec.use_dora:
                raise ConfigError(
                    f"adapter {n!r} is DoRA (on `{s.leaf.module}`): combining DoRA adapters is "
                    "not supported (PEFT combines only their LoRA factors, drops the magnitude "
                    "vectors and gives the new adapter the magnitude of a fresh initialisation)."
                )
            ranks[n] = max(ranks.get(n, 0), spec.r)
        layouts = {spec.layout for _, spec in specs}
        if len(layouts) > 1:
            raise ShapeError(
                f"module `{s.leaf.module}`: the adapters read its weight with different layouts "
                f"{ {n: spec.layout for n, spec in specs} }; they cannot be combined."
            )
        if ct in _FACTOR_WISE:
            rs = {n: spec.r for n, spec in specs}
            if len(set(rs.values())) > 1:
                raise ConfigError(
                    f"combination_type {ct!r} combines the LoRA factors themselves, so the "
                    f"adapters need the same rank, but on `{s.leaf.module}` they have ranks {rs}; "
                    "use 'cat' or an '*svd' type."
                )
    per_adapter = [ranks[n] for n in adapters]
    if ct in _FACTOR_WISE:
        if len(set(per_adapter)) != 1:
            raise ConfigError(
                "All adapters must have the same r value when using combination_type linear, "
                "ties, dare_ties, dare_linear or magnitude_prune; got "
                f"{dict(zip(adapters, per_adapter))} (each adapter's largest rank)."
            )
        return per_adapter[0]
    if ct == "cat":
        return sum(per_adapter)
    return int(svd_rank) if svd_rank is not None else max(per_adapter)  # *svd


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


# ------------------------------------------------------------------------ combining one leaf


def _flat_layers(spec, arrays, n: int):
    """Every array of one adapter as ``(n, *layer shape)`` over the full stack, zeros on the
    slices the adapter does not store."""
    st = 1 if spec.compact else spec.layout.stack
    out = {}
    for k, v in arrays.items():
        v = v.reshape((-1, *v.shape[st:]))
        if spec.compact:
            full = jnp.zeros((n, *v.shape[1:]), v.dtype)
            v = full.at[np.asarray(spec.layers)].set(
                v, indices_are_sorted=True, unique_indices=True
            )
        out[k] = v
    return out


def _store(spec, flat: dict, layers):
    """Full-stack ``(n, ...)`` arrays as the new adapter stores them: only ``layers``
    (compact) or with the stack axes leading; unstacked: the one layer."""
    if not spec.layout.stack:
        return {k: v[0] for k, v in flat.items()}
    if layers is not None:
        idx = np.asarray(layers)
        return {k: v[idx] for k, v in flat.items()}
    stack = spec.layout.stack_shape(spec.shape)
    return {k: v.reshape(stack + v.shape[1:]) for k, v in flat.items()}


def _weight_table(weights, concrete: bool, scales: np.ndarray):
    """PEFT's factor weights ``(sign(w s) sqrt|w s|, sqrt|w s|)`` of adapter ``i`` on layer
    ``l`` (``w_i s_il``, the weight times the scaling): in float64 when the weights are concrete
    (PEFT computes them in Python), float32 when they are traced."""
    if concrete:
        ws = np.asarray(weights, np.float64)[:, None] * scales
        root = np.sqrt(np.abs(ws))
        return np.where(ws >= 0, root, -root).astype(np.float32), root.astype(np.float32)
    w = jnp.stack([jnp.asarray(x, jnp.float32) for x in weights])[:, None]
    ws = w * jnp.asarray(scales, jnp.float32)
    root = jnp.sqrt(jnp.abs(ws))
    return jnp.where(ws >= 0, root, -root), root


def _svd_factors(spec: LoraSpec, d, rank: int, clamp, full: bool):
    """PEFT's SVD step on one layer's combined delta ``d`` (``(in, out)`` matrix view):
    factors of the torch-layout ``d.T``, ``(A (in or conv kernel, k), B (k, out))``."""
    m = d.T  # torch (out, in); a conv's (out, in * kh * kw), PEFT's flatten(1)
    u, s, vh = jnp.linalg.svd(m, full_matrices=full)
    k = min(rank, s.shape[-1])
    u = u[:, :k] * s[:k]
    vh = vh[:k, :]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    a = vh.T
    if spec.layout.kind == "conv":
        lay = (*spec.layout.spatial(spec.shape), spec.shape[-2], k)
        a = Layout("conv").from_matrix(a, lay)
    return a, u.T


def _lora_leaf(site, adapters, weights, concrete, ct, rank, opts, key):
    """The new LoRA adapter's spec on one weight leaf, and the static and array arguments of
    the `_lora_kernel` that makes its arrays."""
    node = site.leaf.value
    specs = tuple(node.spec(n) for _, n in site.present)
    spec0 = specs[0]
    n = spec0.n_layers
    scales = np.asarray([sp.scaling for sp in specs], np.float64)  # (k adapters, n layers)
    wa, wb = _weight_table([weights[i] for i, _ in site.present], concrete, scales)
    w32 = jnp.stack([jnp.asarray(weights[i], jnp.float32) for i, _ in site.present])
    if ct in _FACTOR_WISE:
        layer_rank = spec0.r
    elif ct == "cat":
        layer_rank = rank
    else:
        layer_rank = min(rank, *spec0.in_out)
    keys = None
    if key is not None:
        keys = jax.random.split(jax.random.fold_in(key, site.leaf.index), (n, len(specs), 2))
    layers = sorted(set().union(*(sp.stored_layers for sp in specs)))
    on = set(layers)
    ref = _first_spec(adapters, node, specs)
    new = LoraSpec(
        layout=spec0.layout,
        shape=spec0.shape,
        scaling=tuple(1.0 if i in on else 0.0 for i in range(n)),
        layers=tuple(layers) if spec0.layout.stack else None,
        r=int(layer_rank),
        lora_dropout=ref.lora_dropout,
        init_weights=ref.init_weights,
    )
    dtype = jnp.dtype(node.arrays[site.present[0][1]]["lora_A"].dtype).name
    static = (ct, specs, new, int(rank), opts, dtype)
    arrays = [node.arrays[nm] for _, nm in site.present]
    return new, static, (arrays, wa, wb, w32, keys)


@functools.partial(jax.jit, static_argnums=0)
def _lora_kernels(statics, args):
    """`_lora_kernel` of every leaf, compiled as one function."""
    return [_lora_kernel(st, *a) for st, a in zip(statics, args)]


def _lora_kernel(static, arrays, wa, wb, w32, keys):
    """The new adapter's arrays on one leaf (as `new` stores them), from the adapters' arrays
    there: PEFT's rule of combination type ``ct`` run on each layer slice."""
    ct, specs, new, rank, opts, dtype = static
    density, sign_method, clamp, full = opts
    rule = _rule(ct)
    spec0, n = specs[0], specs[0].n_layers
    flats = [_flat_layers(sp, a, n) for sp, a in zip(specs, arrays)]
    s32 = jnp.asarray(np.asarray([sp.scaling for sp in specs], np.float32))

    def one_layer(arrs, wa_l, wb_l, s_l, k_l):
        a_list = [x["lora_A"] for x in arrs]
        b_list = [x["lora_B"] for x in arrs]
        if ct == "cat":
            a = [
                (a * w32[i].astype(a.dtype)) * s_l[i].astype(a.dtype) for i, a in enumerate(a_list)
            ]
            a, b = jnp.concatenate(a, axis=-1), jnp.concatenate(b_list, axis=0)
            pad = rank - a.shape[-1]
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = jnp.pad(b, [(0, pad), (0, 0)])
            return {"lora_A": a, "lora_B": b}
        if ct in _FACTOR_WISE:
            ka = None if k_l is None else k_l[:, 0]
            kb = None if k_l is None else k_l[:, 1]
            a = _merge(rule, a_list, wa_l, density, sign_method, ka)
            b = _merge(rule, b_list, wb_l, density, sign_method, kb)
            return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}
        deltas = [sp.delta_matrix(x, s_l[i]) for i, (sp, x) in enumerate(zip(specs, arrs))]
        kd = None if k_l is None else k_l[:, 0]
        d = _merge(rule, deltas, w32, density, sign_method, kd)
        a, b = _svd_factors(spec0, d, new.r, clamp, full)
        return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}

    fn = jax.vmap(one_layer, in_axes=(0, 1, 1, 1, None if keys is None else 0))
    return _store(new, fn(flats, wa, wb, s32, keys), new.layers)


def _first_spec(adapters, node, specs):
    """The spec whose settings (dropout, init) the new adapter takes: the first adapter's."""
    return node.spec(adapters[0]) if adapters[0] in node.names else specs[0]


def _ia3_leaf(site, adapters, weights):
    node = site.leaf.value
    specs = [node.spec(n) for _, n in site.present]
    spec0 = specs[0]
    n = spec0.n_layers
    total = None
    for sp, (i, nm) in zip(specs, site.present):
        v = _flat_layers(sp, node.arrays[nm], n)["ia3_l"]
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
        init_weights=_first_spec(adapters, node, specs).init_weights,
    )
    return new, _store(new, {"ia3_l": total}, lay)


# ------------------------------------------------------------------------ the transform


def add_weighted_adapter(
    params,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    key=None,
):
    """A new adapter ``adapter_name`` combined from ``adapters``, as PEFT's
    ``add_weighted_adapter`` (LoRA: every ``combination_type``; IA3: the weighted sum of the
    vectors, the other arguments unused).

    Args:
      params: a tree carrying the adapters (never modified).
      adapters: names of the adapters to combine (LoRA, or IA3; one method). With one adapter
        the combination is ``linear`` whatever ``combination_type`` says (PEFT's rule).
      weights: one real weight per adapter (negative ones subtract); Python numbers, or scalars
        traced under `jax.jit`.
      adapter_name: the new adapter's name (must not exist yet).
      combination_type: ``"svd"`` (default), ``"linear"``, ``"cat"``, ``"ties"``,
        ``"ties_svd"``, ``"dare_linear"``, ``"dare_ties"``, ``"dare_linear_svd"``,
        ``"dare_ties_svd"``, ``"magnitude_prune"`` or ``"magnitude_prune_svd"`` (module
        docstring). ``linear`` and the other factor-wise types need adapters of one rank;
        ``cat``'s rank is the sum of the ranks.
      svd_rank: the new rank for the ``*svd`` types (default: the largest rank of the adapters).
      svd_clamp: a quantile in ``[0, 1]``: the SVD factors are clamped to ``[-q, q]`` with ``q``
        that quantile of their values (``None``: no clamping).
      svd_full_matrices: full or reduced SVD (as ``torch.linalg.svd``; the factors kept are
        the same).
      density: the fraction of values kept, in ``[0, 1]``; required by the ``ties``, ``dare``
        and ``magnitude_prune`` types (``1``: no pruning, with PEFT's warning).
      majority_sign_method: ``"total"`` or ``"frequency"``: how TIES elects each value's sign.
      key: a JAX PRNG key (or int seed) for DARE's random drops; required by the ``dare``
        types. Each module and factor draws its own mask from it.

    Returns:
      A new tree with adapter ``adapter_name`` added beside the others, not active; ``params``
      is left unchanged. The new adapter is a plain LoRA (or IA3) adapter with scaling 1.

    Raises:
      AdapterNameError: an unknown adapter in ``adapters``, or ``adapter_name`` already there.
      ConfigError: ``weights`` of the wrong length; an unknown ``combination_type``; ranks that
        differ where the type needs one rank (the adapters and ranks are named); ``density``
        missing or outside ``[0, 1]``; adapters of other or mixed methods, DoRA, PEFT's
        ``target_parameters``, two adapters with ``modules_to_save`` copies of one module.
      ArgumentTypeError: arguments of the wrong type; ``key`` missing for a DARE type.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> cfg = pj.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
      >>> p = pj.inject(p, cfg, key=jax.random.key(0), name="x")
      >>> p = pj.inject(p, cfg, key=jax.random.key(1), name="y")
      >>> q = pj.add_weighted_adapter(p, ["x", "y"], [0.5, 0.5], "xy", combination_type="cat")
      >>> pj.adapter_names(q), pj.active(q), q["q_proj"]["kernel"].spec("xy").r
      (('x', 'y', 'xy'), ('x',), 4)
    """
    adapters, weights, concrete, density, key = _check_args(
        params,
        adapters,
        weights,
        adapter_name,
        combination_type,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        density,
        majority_sign_method,
        key,
    )
    leaves, treedef = walk(params)
    sites, copies, derived, method = _survey(leaves, adapters)
    _check_copies(copies, adapters)
    if method == "ia3":
        _check_ia3(sites)
        new = {s.leaf.index: _ia3_leaf(s, adapters, weights) for s in sites}
    else:
        ct = "linear" if len(adapters) == 1 else combination_type
        rank = _check_lora(sites, adapters, ct, svd_rank)
        density, key = _check_density(ct, density, key)
        if density is not None and density >= 1:  # nothing is pruned: the same kernel as
            ct, key = _UNPRUNED.get(ct, ct), None  # the rule without pruning
        clamp = None if svd_clamp is None else float(svd_clamp)
        opts = (density, majority_sign_method, clamp, bool(svd_full_matrices))
        todo = [_lora_leaf(s, adapters, weights, concrete, ct, rank, opts, key) for s in sites]
        outs = _lora_kernels(tuple(t[1] for t in todo), [t[2] for t in todo])
        new = {s.leaf.index: (t[0], o) for s, t, o in zip(sites, todo, outs)}
    frozen = any(adapters[0] in l.value.frozen for l in leaves if is_adapted(l.value))
    groups = group_modules(leaves)
    for l in derived:  # IA3 bias markers follow the new vector of their module's weight
        spec = next(l.value.spec(n) for n in adapters if n in l.value.names)
        owner = next((o for o in groups[l.module] if o.name == spec.owner), None)
        if owner is not None and owner.index in new:
            companion = new[owner.index][0].bias_companion(tuple(l.base.shape), spec.owner)
            if companion is not None:
                new[l.index] = (companion, {})
    for l in copies:  # PEFT re-injects the first adapter's modules_to_save: a fresh base copy
        if _is_copy(l.value, adapters[0]):
            spec = modules_to_save_spec(tuple(l.base.shape))
            new[l.index] = (spec, spec.init(None, l.base))
    out = []
    for l in leaves:
        if l.index in new:
            spec, arrays = new[l.index]
            node: Adapted = l.value
            l = dataclasses.replace(
                l,
                value=node.replace(
                    specs=node.specs + ((adapter_name, spec),),
                    arrays={**node.arrays, adapter_name: arrays},
                    frozen=node.frozen + ((adapter_name,) if frozen else ()),
                ),
            )
        out.append(l)
    return place(rebuild(treedef, out))
