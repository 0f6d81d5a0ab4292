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
import math
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import group_modules, rebuild, walk
from .errors import AdapterNameError, ArgumentTypeError, ConfigError
from .methods import DELTA, DERIVED, METHODS, is_modules_to_save, modules_to_save_spec
from .methods._combine import COMBINATION_TYPES, DENSITY_TYPES, CombineCall, Site
from .node import Adapted, is_adapted
from .sharding import place
from .transforms import _key_arg, adapter_names, check_names, names_arg

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

_SIGN_METHODS = ("total", "frequency")


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
    if ct not in DENSITY_TYPES:
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
            stacklevel=5,  # the caller of add_weighted_adapter (via the combiner and its call)
        )
    return density, key


# ------------------------------------------------------------------------ what the tree holds


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
            sites.append(Site(l, delta))
    combinable = sorted(m.name for m in METHODS.values() if m.combine is not None)
    for n in adapters:
        bad = {m for m in methods[n] if m not in METHODS or METHODS[m].combine is None}
        if bad:
            raise ConfigError(
                f"adapter {n!r} is {sorted(bad)[0]}: `add_weighted_adapter` combines adapters of "
                f"the methods whose PEFT models have it ({', '.join(combinable)}) only."
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
    return is_modules_to_save(spec)


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
    call = CombineCall(
        sites=sites,
        adapters=tuple(adapters),
        weights=weights,
        concrete=concrete,
        combination_type=combination_type,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=bool(svd_full_matrices),
        majority_sign_method=majority_sign_method,
        check_density=lambda ct: _check_density(ct, density, key),
    )
    combine = METHODS[method].combine
    if combine is None:  # `_survey` refused it already
        raise ConfigError(f"`add_weighted_adapter` cannot combine {method} adapters.")
    new = combine(call)
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
