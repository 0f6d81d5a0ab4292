"""HF PEFT's tuner-layer API (``BaseTuner`` / ``BaseTunerLayer`` / LyCORIS layers) as pure
transforms: disabling adapters, gradients per adapter, scaling, per-module deltas.

Each function returns a new tree (inputs are never modified, results share no mutable container
with them) or a new array; bad input raises a `peftjax.errors.PeftJaxError` naming the argument,
adapter or module path, before anything is built.

* `disable_adapters` / `enable_adapters` / `adapters_disabled`: PEFT's ``disable_adapter()``
  context manager, as a pair. Disabled params act as the base model (``pj.apply`` gives base
  outputs; `pj.partition` gives nothing trainable, as PEFT turns gradients off) while the active
  set is kept (`pj.active` is unchanged, as PEFT's ``active_adapters``); `enable_adapters` turns
  them back on exactly as they were (frozen adapters stay frozen).
* `set_requires_grad`: PEFT's ``set_requires_grad(adapter_names, requires_grad)``: a frozen
  adapter still acts but trains no more (`pj.set_trainable` with PEFT's argument names).
* `set_scale` / `scale_layer` / `unscale_layer`: PEFT's LoRA and LyCORIS layer methods on every
  module of the tree. They apply to methods whose scaling is ``alpha / r`` (their config has
  ``rank_alpha``); others are refused. The scaling the adapter was made with is kept on the spec
  (``Spec.initial_scaling``) so that ``set_scale`` and ``unscale_layer()`` work from it, and layer
  slices excluded by ``layers_to_transform`` (scaling ``0``) stay excluded.
* `get_delta_weight`: PEFT's ``get_delta_weight(adapter)`` of one module, in the base weight's
  own shape and orientation, float32.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import Leaf, adapted_nodes, group_modules, rebuild, walk, weight_leaf
from .config import AdapterConfig
from .errors import (
    AdapterNameError,
    AdapterNameTypeError,
    ArgumentTypeError,
    ConfigError,
    MergeError,
    TargetError,
    UnsupportedModuleError,
)
from .methods import DELTA, Spec, method_of
from .node import Adapted, is_adapted
from .transforms import check_names, names_arg, set_trainable, unmerge, with_shared

__all__ = [
    "adapters_disabled",
    "disable_adapters",
    "enable_adapters",
    "get_delta_weight",
    "scale_layer",
    "set_requires_grad",
    "set_scale",
    "unscale_layer",
]


def _require_adapters(params, fn: str) -> tuple[list[Leaf], object]:
    leaves, treedef = walk(params)
    if not adapted_nodes(leaves):
        raise AdapterNameError(
            f"`{fn}`: `params` carries no adapter; add one with `pj.inject` or "
            "`pj.load_pretrained` first."
        )
    return leaves, treedef


def _with_node(l: Leaf, node: Adapted) -> Leaf:
    return dataclasses.replace(l, value=node)


# ---------------------------------------------------------------------------- enable / disable


def adapters_disabled(params) -> bool:
    """Whether the adapters of ``params`` are disabled (`disable_adapters`); ``False`` for a
    tree without adapters.

    Args:
      params: any pytree; its adapter-carrying weights (`Adapted` nodes) are read.

    Returns:
      ``True`` while `disable_adapters` is in effect, else ``False``.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> pj.adapters_disabled(p), pj.adapters_disabled(pj.disable_adapters(p))
      (False, True)
    """
    return any(node.disabled for node in adapted_nodes(walk(params)[0]))


def disable_adapters(params):
    """``params`` acting as the base model, its active adapters remembered (PEFT's
    ``disable_adapter()`` context manager; `enable_adapters` is its exit).

    While disabled, `pj.apply` runs the base weights only, `pj.partition` / `pj.trainable_mask`
    / `pj.count_parameters` see no trainable adapter (PEFT turns their gradients off), and
    `pj.active` still lists the active adapters (PEFT's ``active_adapters``). Merged adapters
    are unmerged first, with a warning, as PEFT's disabled forward unmerges them; they stay
    unmerged after `enable_adapters`, as in PEFT. `pj.merge` refuses disabled params (the merged
    weights would act); `pj.merge_and_unload` merges the active adapters all the same, as PEFT's
    does inside ``disable_adapter()``. Disabling twice is the same as once.

    Adapters injected into disabled params on modules that had none are not disabled (PEFT's
    new layers are not either); `disable_adapters` again disables them.

    Args:
      params: the adapter-carrying tree.

    Returns:
      A new tree whose adapters are disabled (and unmerged), the active set unchanged.

    Raises:
      AdapterNameError: ``params`` carries no adapter.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> d = pj.disable_adapters(p)
      >>> pj.active(d), pj.count_parameters(d)  # still active, but nothing trains
      (('default',), (0, 26))
    """
    leaves, treedef = _require_adapters(params, "disable_adapters")
    merged = sorted({n for node in adapted_nodes(leaves) for n in node.merged})
    if merged:
        warnings.warn(
            f"`disable_adapters`: adapters {merged} are merged; unmerging them first (as PEFT's "
            "forward does inside `disable_adapter()`). `enable_adapters` leaves them unmerged.",
            UserWarning,
            stacklevel=2,
        )
        leaves, treedef = walk(unmerge(params))
    return rebuild(
        treedef,
        [
            _with_node(l, l.value.replace(disabled=True)) if is_adapted(l.value) else l
            for l in leaves
        ],
    )


def enable_adapters(params):
    """Undo `disable_adapters`: every adapter acts again as it did (same active set, same
    frozen adapters). On params that are not disabled it changes nothing.

    Args:
      params: the adapter-carrying tree.

    Returns:
      A new tree whose adapters are enabled.

    Raises:
      AdapterNameError: ``params`` carries no adapter.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> e = pj.enable_adapters(pj.disable_adapters(p))
      >>> pj.adapters_disabled(e), pj.count_parameters(e)
      (False, (14, 26))
    """
    leaves, treedef = _require_adapters(params, "enable_adapters")
    return rebuild(
        treedef,
        [
            _with_node(l, l.value.replace(disabled=False)) if is_adapted(l.value) else l
            for l in leaves
        ],
    )


# ---------------------------------------------------------------------------- gradients


def set_requires_grad(params, adapter_names: str | Sequence[str], requires_grad: bool = True):
    """PEFT's ``set_requires_grad``: adapters ``adapter_names`` (a str or a list of str) made
    trainable (``requires_grad=True``) or frozen (``False``).

    A frozen adapter still acts when active, but `pj.partition`, `pj.trainable_mask`,
    `pj.adapter_optimizer` and `pj.count_parameters` leave its arrays out (`pj.set_trainable`).
    Arrays a method never trains (`Spec.frozen_arrays`) stay frozen when ``requires_grad=True``,
    as PEFT re-freezes them. Unlike PEFT, an unknown adapter name is an error, not ignored.

    Args:
      params: the adapter-carrying tree.
      adapter_names: an adapter name or a list of names (``[]``: no change).
      requires_grad: ``True`` to train the adapters, ``False`` to freeze them.

    Returns:
      A new tree with the adapters marked.

    Raises:
      AdapterNameError: an unknown name in ``adapter_names``.
      AdapterNameTypeError: ``adapter_names`` is ``None``, or not a str or a list of str.
      ArgumentTypeError: ``requires_grad`` is not a bool.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> f = pj.set_requires_grad(p, "default", requires_grad=False)
      >>> pj.frozen_adapters(f), pj.count_parameters(f)
      (('default',), (0, 26))
    """
    if adapter_names is None:
        raise AdapterNameTypeError(
            "`adapter_names`: expected an adapter name (str) or a list of names, got None."
        )
    if not isinstance(requires_grad, (bool, np.bool_)):
        raise ArgumentTypeError(f"`requires_grad`: expected a bool, got {requires_grad!r}.")
    names = names_arg(adapter_names, "adapter_names")
    check_names(params, names, "adapter_names")
    if not names:
        leaves, treedef = walk(params)
        return rebuild(treedef, leaves)
    return set_trainable(params, names, trainable=bool(requires_grad))


# ---------------------------------------------------------------------------- scaling


def _scalable(spec: Spec) -> bool:
    """Whether PEFT's ``set_scale`` family applies: an additive adapter whose method's config
    computes its scaling from ``(r, alpha)`` (``rank_alpha``)."""
    if spec.role != DELTA:
        return False
    try:
        config = method_of(spec).config
    except ConfigError:
        return False
    # the config hook: methods whose scaling comes from `scaling(r, alpha)` override it
    return getattr(config, "rank_alpha", None) is not getattr(AdapterConfig, "rank_alpha", None)


def _scale_arg(scale, field: str, nonzero: bool = False) -> float:
    if isinstance(scale, jax.core.Tracer):
        raise ArgumentTypeError(
            f"`{field}`: the scaling is static adapter metadata, so it needs a concrete number, "
            "got a traced value (call this outside `jax.jit` / `grad`)."
        )
    ok = isinstance(scale, numbers.Real) and not isinstance(scale, (bool, np.bool_))
    if not ok and isinstance(scale, (np.ndarray, jax.Array)) and np.shape(scale) == ():
        ok = np.issubdtype(np.asarray(scale).dtype, np.floating) or np.issubdtype(
            np.asarray(scale).dtype, np.integer
        )
    if not ok:
        raise ArgumentTypeError(
            f"`{field}`: expected a real number, got {type(scale).__name__} {scale!r}."
        )
    value = float(scale)
    if not math.isfinite(value) or (nonzero and value == 0.0):
        what = "a finite, nonzero real number" if nonzero else "a finite real number"
        raise ArgumentTypeError(f"`{field}`: expected {what}, got {scale!r}.")
    return value


def _initial(spec: Spec) -> tuple[float, ...]:
    return spec.scaling if spec.initial_scaling is None else spec.initial_scaling


def _rescaled(spec: Spec, new) -> Spec:
    """``spec`` with per-layer scaling ``new(initial, current)``; layers whose initial scaling is
    ``0`` (excluded by ``layers_to_transform``) stay ``0``."""
    init = _initial(spec)
    scaling = tuple(0.0 if b == 0 else float(new(b, c)) for b, c in zip(init, spec.scaling))
    return dataclasses.replace(
        spec, scaling=scaling, initial_scaling=None if scaling == tuple(init) else tuple(init)
    )


def _rescale(params, which, new, fn: str):
    """Apply `_rescaled` to the scalable specs of adapters ``which(node)`` on every node."""
    leaves, treedef = _require_adapters(params, fn)
    touched: dict[str, bool] = {}
    for l in leaves:
        node = l.value
        if not is_adapted(node):
            continue
        for n in which(node):
            scalable = _scalable(node.spec(n))
            touched[n] = touched.get(n, False) or scalable
            if scalable and n in node.merged:
                raise MergeError(
                    f"`{fn}`: adapter {n!r} is merged into `{l.module}` with its current scaling; "
                    "`pj.unmerge` before changing it."
                )
    refused = [n for n, ok in touched.items() if not ok]
    if refused:
        methods = sorted(
            {
                node.spec(n).method
                for node in adapted_nodes(leaves)
                for n in refused
                if n in node.names
            }
        )
        raise UnsupportedModuleError(
            f"`{fn}`: adapter(s) {refused} (method {', '.join(methods)}) have no scale to set: "
            "PEFT's set_scale / scale_layer / unscale_layer apply to methods whose scaling is "
            "alpha / r (LoRA and the LyCORIS methods)."
        )
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            mine = set(which(node))
            specs = tuple(
                (n, _rescaled(s, new) if n in mine and _scalable(s) else s) for n, s in node.specs
            )
            l = _with_node(l, node.replace(specs=specs))
        out.append(l)
    return rebuild(treedef, out)


def set_scale(params, adapter: str, scale):
    """PEFT's ``set_scale(adapter, scale)`` on every module of ``adapter``: its scaling becomes
    ``scale`` times the scaling it was made with (``scale * alpha / r``, ``/ sqrt(r)`` with
    rsLoRA; per module, as ``rank_pattern`` / ``alpha_pattern`` gave it), active or not.

    Refused for a merged adapter (`pj.unmerge` first) and for methods without a scale. The new
    scaling is the adapter's from then on (`pj.save_pretrained` writes the matching alpha).

    Args:
      params: the adapter-carrying tree.
      adapter: the adapter's name.
      scale: a finite real number (a Python number or a 0-d array), relative to the scaling
        the adapter was made with.

    Returns:
      A new tree with the adapter's scaling changed on every module.

    Raises:
      AdapterNameError: ``params`` has no adapter ``adapter``.
      AdapterNameTypeError: ``adapter`` is not a str.
      ArgumentTypeError: ``scale`` is not a finite real number (or is traced).
      MergeError: the adapter is merged.
      UnsupportedModuleError: the adapter's method has no ``alpha / r`` scaling.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> p["fc"]["kernel"].spec("default").scaling  # lora_alpha / r = 8 / 2
      (4.0,)
      >>> pj.set_scale(p, "default", 0.5)["fc"]["kernel"].spec("default").scaling
      (2.0,)
    """
    if not isinstance(adapter, str):
        raise AdapterNameTypeError(
            f"`adapter`: expected an adapter name (str), got {type(adapter).__name__} {adapter!r}."
        )
    check_names(params, [adapter], "adapter")
    s = _scale_arg(scale, "scale")
    return _rescale(
        params,
        lambda node: [adapter] if adapter in node.names else [],
        lambda init, cur: s * init,
        "set_scale",
    )


def _active_here(node: Adapted) -> list[str]:
    return [n for n in node.active if n in node.names]


def scale_layer(params, scale):
    """PEFT's ``scale_layer(scale)`` on every module: the scaling of each active adapter is
    multiplied by ``scale`` (relative to its current value; ``scale == 1`` changes nothing).

    Args:
      params: the adapter-carrying tree.
      scale: a finite real number (a Python number or a 0-d array).

    Returns:
      A new tree with the active adapters' scaling multiplied by ``scale``.

    Raises:
      AdapterNameError: ``params`` carries no adapter.
      ArgumentTypeError: ``scale`` is not a finite real number (or is traced).
      MergeError: an active adapter is merged.
      UnsupportedModuleError: an active adapter's method has no ``alpha / r`` scaling.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> twice = pj.scale_layer(pj.scale_layer(p, 0.5), 0.5)
      >>> twice["fc"]["kernel"].spec("default").scaling  # 4.0 * 0.5 * 0.5
      (1.0,)
    """
    s = _scale_arg(scale, "scale")
    if s == 1.0:  # PEFT returns at once
        leaves, treedef = _require_adapters(params, "scale_layer")
        return rebuild(treedef, leaves)
    return _rescale(params, _active_here, lambda init, cur: cur * s, "scale_layer")


def unscale_layer(params, scale=None):
    """PEFT's ``unscale_layer(scale=None)`` on every module: the scaling of each active adapter
    is divided by ``scale``, or reset to the scaling it was made with (``alpha / r``) when
    ``scale`` is ``None``.

    Args:
      params: the adapter-carrying tree.
      scale: a finite, nonzero real number, or ``None`` (default) to reset the scaling.

    Returns:
      A new tree with the active adapters' scaling divided by ``scale`` (or reset).

    Raises:
      AdapterNameError: ``params`` carries no adapter.
      ArgumentTypeError: ``scale`` is not a finite, nonzero real number (or is traced).
      MergeError: an active adapter is merged.
      UnsupportedModuleError: an active adapter's method has no ``alpha / r`` scaling.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> s = pj.scale_layer(p, 0.5)
      >>> pj.unscale_layer(s, 4)["fc"]["kernel"].spec("default").scaling  # 2.0 / 4
      (0.5,)
      >>> pj.unscale_layer(s)["fc"]["kernel"].spec("default").scaling  # back to 8 / 2
      (4.0,)
    """
    if scale is None:
        return _rescale(params, _active_here, lambda init, cur: init, "unscale_layer")
    s = _scale_arg(scale, "scale", nonzero=True)
    return _rescale(params, _active_here, lambda init, cur: cur / s, "unscale_layer")


# ---------------------------------------------------------------------------- delta weight


def _delta(spec: Spec, arrays) -> jax.Array:
    """The float32 delta of every layer slice in the base weight's shape (excluded slices 0)."""
    stack = spec.layout.stack_shape(spec.shape)
    if not stack:
        return spec.delta_layer(arrays, jnp.float32(spec.scaling[0])).astype(jnp.float32)
    n = spec.n_layers
    if spec.compact:
        flat = arrays
    else:
        flat = {k: v.reshape((n,) + v.shape[len(stack) :]) for k, v in arrays.items()}
    d = jax.vmap(spec.delta_layer)(flat, spec.stored_scales()).astype(jnp.float32)
    if not spec.compact:
        return d.reshape(spec.shape)
    idx = np.asarray(spec.stored_layers)
    full = jnp.zeros((n, *spec.layer_shape), jnp.float32)
    full = full.at[idx].set(d, indices_are_sorted=True, unique_indices=True)
    return full.reshape(spec.shape)


def get_delta_weight(params, module_path: str, name: str = "default") -> jax.Array:
    """PEFT's ``get_delta_weight(adapter)`` of module ``module_path``: the weight change adapter
    ``name`` makes there, float32, in the base weight's own shape and orientation (a stacked
    weight: every layer slice, ``0`` on slices the adapter excludes), with its current scaling,
    whether active, inactive or merged. For additive methods (the base weight plus this delta);
    DoRA gives its low-rank part ``scale * A @ B`` as PEFT's does. Other methods are refused.

    Args:
      params: the adapter-carrying tree.
      module_path: the dotted module path, as `pj.targeted_modules` lists it.
      name: the adapter's name.

    Returns:
      A float32 array of the base weight's shape.

    Raises:
      AdapterNameError: ``params`` has no adapter ``name``.
      AdapterNameTypeError: ``name`` is not a str.
      ArgumentTypeError: ``module_path`` is not a str.
      TargetError: no module ``module_path``, or it does not carry ``name``.
      UnsupportedModuleError: the method adds no delta to the weight (IA3, OFT, prompt
        learning...).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> d = pj.get_delta_weight(p, "fc")
      >>> d.shape, d.dtype, float(jnp.abs(d).max())  # LoRA starts as the zero delta
      ((4, 3), dtype('float32'), 0.0)
    """
    if not isinstance(module_path, str):
        raise ArgumentTypeError(
            f"`module_path`: expected a dotted module path (str), got "
            f"{type(module_path).__name__} {module_path!r}."
        )
    if not isinstance(name, str):
        raise AdapterNameTypeError(
            f"`name`: expected an adapter name (str), got {type(name).__name__} {name!r}."
        )
    check_names(params, [name], "name")
    leaves, _ = walk(params)
    groups = group_modules(leaves)
    carrying = sorted({l.module for l in leaves if is_adapted(l.value) and name in l.value.names})
    group = groups.get(module_path)
    cands = [l for l in group or () if is_adapted(l.value) and name in l.value.names]
    if not cands:
        problem = (
            f"no module `{module_path}`"
            if group is None
            else f"module `{module_path}` carries no adapter {name!r}"
        )
        raise TargetError(
            f"`module_path`: {problem}; adapter {name!r} is on {carrying[:8]}"
            + (f" and {len(carrying) - 8} more." if len(carrying) > 8 else ".")
        )
    w = weight_leaf(group or [])  # `cands` is not empty, so `group` is not None
    deltas = [l for l in cands if l.value.spec(name).role == DELTA]
    leaf = next((l for l in deltas if l is w), deltas[0] if deltas else cands[0])
    node = leaf.value
    spec = node.spec(name)
    no_delta = (
        f"`get_delta_weight`: adapter {name!r} on `{module_path}` (method {spec.method}) has no "
        "additive delta weight (PEFT's get_delta_weight is for methods that add a delta to the "
        "base weight)."
    )
    if spec.role != DELTA:
        raise UnsupportedModuleError(no_delta)
    arrays = with_shared(groups, spec, name, node.arrays[name])
    try:
        return _delta(spec, arrays)
    except NotImplementedError:
        raise UnsupportedModuleError(no_delta) from None
