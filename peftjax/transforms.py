"""The pure transforms: inject, set_active, delete, merge, unmerge, merge_and_unload, unload,
and the queries. None of them modifies its input; each returns a new tree.

Module paths are `peftjax._tree`'s; which modules a config adapts is `peftjax._plan`'s; what
each method does is its registry row's (`peftjax.methods`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import paths as P
from ._plan import plan_injection
from ._tree import (
    Leaf,
    adapted_nodes,
    bias_leaf,
    global_active,
    group_modules,
    rebuild,
    subtree_leaves,
    walk,
    weight_leaf,
)
from .config import AdapterConfig
from .errors import (
    AdapterNameError,
    AdapterNameTypeError,
    ArgumentTypeError,
    ConfigError,
    MergeError,
    TargetError,
)
from .layout import Layout, LayoutSpec
from .methods import COPY, DERIVED, PROMPT, Spec, modules_to_save_spec
from .node import Adapted, is_adapted
from .quantize import as_float, dequantize, is_quantized, quantize_array
from .sharding import abstract_like, place, place_node


def adapter_names(params) -> tuple[str, ...]:
    """Names of the adapters in ``params``, in the order they were injected.

    Each node lists its adapters in injection order; the lists are merged (a topological
    order, ties broken by first appearance in the tree), so an adapter injected later is never
    listed before an earlier one that shares a module with it. The order of adapters that share
    no module (directly or through others) is not recorded and follows the tree.

    Args:
      params: any pytree; its adapter-carrying weights (`Adapted` nodes) are read.

    Returns:
      A tuple of adapter names, ``()`` for a tree without adapters.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> pj.adapter_names(pj.inject(p, cfg, key=1, name="other"))
      ('default', 'other')
    """
    seen: dict[str, None] = {}
    after: dict[str, set[str]] = {}
    for node in adapted_nodes(walk(params)[0]):
        names = node.names
        for n in names:
            seen[n] = None
            after.setdefault(n, set())
        for a, b in zip(names, names[1:], strict=False):
            after[b].add(a)
    out: list[str] = []
    left = list(seen)
    while left:
        ready = next((n for n in left if not (after[n] & set(left))), left[0])
        out.append(ready)
        left.remove(ready)
    return tuple(out)


def active(params) -> tuple[str, ...]:
    """The active adapter names (``()`` when adapters are off or there are none).

    Args:
      params: any pytree; its adapter-carrying weights (`Adapted` nodes) are read.

    Returns:
      A tuple of adapter names, in activation order. `pj.disable_adapters` keeps the active set
      (as PEFT's ``active_adapters``); `set_active` with ``None`` empties it.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> pj.active(p), pj.active(pj.set_active(p, None))
      (('default',), ())
    """
    return global_active(walk(params)[0])


def targeted_modules(params, name: str | None = None) -> list[str]:
    """Sorted module paths carrying adapter ``name`` (any adapter when ``None``).

    Args:
      params: the adapter-carrying tree.
      name: an adapter name, or ``None`` for the modules carrying any adapter.

    Returns:
      A sorted list of dotted module paths (``[]`` for a tree without adapters).

    Raises:
      AdapterNameError: ``params`` has no adapter ``name``.
      AdapterNameTypeError: ``name`` is not a str.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = {"fc": {"kernel": jnp.ones((4, 3))}, "out": {"kernel": jnp.ones((3, 2))}}
      >>> p = pj.inject(p, pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> pj.targeted_modules(p), pj.targeted_modules(p, "default")
      (['fc'], ['fc'])
    """
    if name is not None:
        check_names(params, [name], "name")
    mods = set()
    for l in walk(params)[0]:
        if is_adapted(l.value) and (name is None or name in l.value.names):
            mods.add(l.module)
    return sorted(mods)


def names_arg(names, field: str) -> tuple[str, ...]:
    """``names`` (a str, a sequence of str, or ``None``) as a tuple; a peftjax error otherwise."""
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, (Sequence, set, frozenset)) or isinstance(names, (bytes, bytearray)):
        raise AdapterNameTypeError(
            f"`{field}`: expected an adapter name (str), a list of names or None, got "
            f"{type(names).__name__} {names!r}."
        )
    out = tuple(names)
    for n in out:
        if not isinstance(n, str):
            raise AdapterNameTypeError(
                f"`{field}`: adapter names are str, got {type(n).__name__} {n!r} in {names!r}."
            )
    return out


def check_names(params, names, field: str):
    have = adapter_names(params)
    for n in names:
        if not isinstance(n, str):
            raise AdapterNameTypeError(
                f"`{field}`: adapter names are str, got {type(n).__name__} {n!r}."
            )
        if n not in have:
            raise AdapterNameError(
                f"`{field}`: no adapter named {n!r}; the adapters are {list(have)}."
            )


# ---------------------------------------------------------------------------------- inject


def _validate_name(name, leaves):
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"`name` must be a non-empty str, got {name!r}.")
    for node in adapted_nodes(leaves):
        if name in node.names:
            raise AdapterNameError(
                f"`name`: an adapter named {name!r} already exists; pick another name or "
                "`pj.delete` it first."
            )


def _new_node(
    l: Leaf, name: str, spec: Spec, arrays, act: tuple[str, ...], frozen: bool = False
) -> Adapted:
    if is_adapted(l.value):
        node = l.value
        return node.replace(
            arrays={**node.arrays, name: arrays},
            specs=node.specs + ((name, spec),),
            active=act,
            frozen=node.frozen + ((name,) if frozen else ()),
        )
    return Adapted(l.value, {name: arrays}, ((name, spec),), act, (), (name,) if frozen else ())


def _key_arg(key):
    """``key`` as a PRNG key: a typed key (``jax.random.key``), a raw ``uint32[2]`` key
    (``jax.random.PRNGKey``) or a Python / numpy int (``jax.random.key(int)``)."""
    if isinstance(key, (bool, np.bool_)):
        raise ArgumentTypeError(f"`key`: expected a PRNG key or an int seed, got {key!r}.")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    dt = getattr(key, "dtype", None)
    if isinstance(key, (jax.Array, np.ndarray)) and dt is not None:
        if jnp.issubdtype(dt, jax.dtypes.prng_key) and key.shape == ():
            return key
        if dt == jnp.uint32 and tuple(key.shape) == (2,):
            return key
    what = (
        f"an array of shape {tuple(key.shape)} and dtype {dt}"
        if dt is not None and hasattr(key, "shape")
        else f"{type(key).__name__} {key!r}"
    )
    raise ArgumentTypeError(
        f"`key`: expected a PRNG key (`jax.random.key(0)`) or an int seed, got {what}."
    )


def _abstract(params) -> bool:
    """True when ``params`` holds ``jax.ShapeDtypeStruct`` leaves and only array-like leaves
    (`inject` then runs under ``jax.eval_shape``)."""
    leaves = jax.tree_util.tree_leaves(params)
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves) and all(
        hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves
    )


def _check_layout_keys(layouts, groups: dict[str, list[Leaf]]) -> None:
    """Every key of a ``layouts`` dict must match some module (resolve_layout's rule)."""
    if layouts is None or isinstance(layouts, Layout) or callable(layouts):
        return
    if not isinstance(layouts, Mapping):
        raise ArgumentTypeError(
            "`layouts`: expected a `pj.Layout`, a dict {module regex or suffix: Layout} or a "
            f"callable (module_path, array) -> Layout | None, got {type(layouts).__name__}."
        )
    mods = [m for m, g in groups.items() if m and weight_leaf(g) is not None] or [
        m for m in groups if m
    ]
    unmatched = []
    for pat, lay in layouts.items():
        if not isinstance(pat, str):
            raise ArgumentTypeError(f"`layouts`: keys are module regexes or suffixes, got {pat!r}.")
        if not isinstance(lay, Layout):
            raise ArgumentTypeError(
                f"`layouts[{pat!r}]`: expected a `pj.Layout`, got {type(lay).__name__} {lay!r}."
            )
        try:
            rx = re.compile(pat)
        except re.error as err:
            raise TargetError(f"`layouts` key {pat!r} is not a valid regex: {err}.") from None
        if not any(rx.fullmatch(m) or m == pat or m.endswith("." + pat) for m in mods):
            unmatched.append(pat)
    if unmatched:
        raise TargetError(
            f"`layouts`: key(s) {unmatched} match no module (a key is a regex full match, a whole "
            f"module path or a `.`-suffix of one); modules here include {mods[:8]}"
            + (f" and {len(mods) - 8} more." if len(mods) > 8 else ".")
        )


def inject(
    params,
    config: AdapterConfig,
    *,
    key: jax.Array,
    name: str = "default",
    layouts: LayoutSpec = None,
    dtype=jnp.float32,
    activate: bool | None = None,
    trainable: bool | None = None,
):
    """Add adapter ``name`` at every module ``config`` targets, initialised as PEFT does.

    Args:
      params: a linen param dict (with or without ``params``), an nnx ``State`` or any pytree.
      config: the config of any registered method (`peftjax.methods.METHODS`).
      key: PRNG key for the initialisation (each module gets ``fold_in(key, i)``); an int
        seed means ``jax.random.key(seed)``.
      name: the adapter's name.
      layouts: how to read weights that are not plain 2-D dense / 4-D conv / embedding tables:
        a `Layout`, a dict ``{module regex or suffix: Layout}`` or a callable
        ``(module_path, array) -> Layout | None``. Stacked (scanned) layers need
        ``Layout("dense", stack=1)``.
      dtype: dtype of the adapter arrays (PEFT keeps adapters in float32).
      activate: make ``name`` active. Default, as PEFT: only when it is the first adapter.
      trainable: whether `partition` / `trainable_mask` / `count_parameters` treat the adapter
        as trainable. Default: ``not config.inference_mode`` (PEFT: an adapter made with
        ``inference_mode=True`` is frozen). `set_trainable` changes it later.

    Returns:
      A new tree; ``params`` is left unchanged. On ``jax.ShapeDtypeStruct`` leaves the call runs
      under ``jax.eval_shape`` and every leaf of the result is a ``ShapeDtypeStruct``.

    Raises:
      ConfigError: ``config`` is not a peftjax config, a field the tree cannot serve (e.g.
        ``target_modules=None``), or one trainable adapter more than the method allows
        (``max_trainable``: AdaLoRA trains one at a time).
      AdapterNameError: ``name`` is empty, not a str, or already in ``params``.
      ArgumentTypeError: ``key``, ``activate``, ``trainable`` or ``layouts`` of the wrong type.
      TargetError: ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
        ``modules_to_save``, ``target_parameters`` or a ``layouts`` key selects nothing, or is
        malformed; the message names the field.
      UnsupportedModuleError: a targeted weight the method cannot adapt (its kind or shape).

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> p2 = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0))
      >>> pj.targeted_modules(p2)
      ['q_proj']
      >>> {k: v.shape for k, v in p2["q_proj"]["kernel"].arrays["default"].items()}
      {'lora_A': (4, 2), 'lora_B': (2, 6)}
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"`config` must be a peftjax config, got {type(config).__name__}.")
    key = _key_arg(key)
    if trainable is None:
        trainable = not bool(getattr(config, "inference_mode", False))
    elif not isinstance(trainable, (bool, np.bool_)):
        raise ArgumentTypeError(f"`trainable`: expected a bool or None, got {trainable!r}.")
    if activate is not None and not isinstance(activate, (bool, np.bool_)):
        raise ArgumentTypeError(f"`activate`: expected a bool or None, got {activate!r}.")
    kw = dict(name=name, layouts=layouts, dtype=dtype, activate=activate, trainable=trainable)
    if _abstract(params):
        # abstract leaves: check everything on the abstract tree, then run under eval_shape
        out = jax.eval_shape(lambda p: inject(p, config, key=key, **kw), params)
        return abstract_like(out, params)  # the rule's shardings, where the inputs had some
    leaves, treedef = walk(params)
    _validate_name(name, leaves)
    _check_trainable_count(config, leaves, bool(trainable))
    groups = group_modules(leaves)
    _check_layout_keys(layouts, groups)
    mts = getattr(config, "modules_to_save", None)
    save_paths = P.select_modules_to_save(list(groups), mts) if mts else []
    plan = plan_injection(config, groups, layouts, save_paths)
    prior = global_active(leaves)
    do_activate = (not adapted_nodes(leaves)) if activate is None else activate
    act = (prior + (name,)) if do_activate and name not in prior else prior
    new = _build(config, plan, leaves, groups, save_paths, key, name, dtype, act, not trainable)
    return place(rebuild(treedef, [_with_active(l, act) for l in new]))


def _check_trainable_count(config: AdapterConfig, leaves, trainable: bool) -> None:
    """`AdapterConfig.max_trainable`: refuse one trainable adapter too many of the method."""
    limit = config.max_trainable
    if limit is None or not trainable:
        return
    have = {
        n
        for node in adapted_nodes(leaves)
        for n, spec in node.specs
        if spec.method == config.method and n not in node.frozen
    }
    if len(have) >= limit:
        raise ConfigError(
            f"{type(config).__name__}: the tree already has {len(have)} trainable "
            f"{config.method} adapter(s) {sorted(have)}, and {config.method} trains at most "
            f"{limit} at a time (PEFT's rule); inject this one with `inference_mode=True` (or "
            "`trainable=False`), or `pj.set_trainable(params, name, False)` the other first."
        )


def _build(config, plan, leaves, groups, save_paths, key, name, dtype, act, frozen) -> list[Leaf]:
    """The leaves with adapter ``name`` added as ``plan`` says (module ``i`` initialised with
    ``fold_in(key, i)``), and the ``modules_to_save`` copies."""
    new = list(leaves)

    def add(l: Leaf, spec, arrays) -> None:
        node = _new_node(new[l.index], name, spec, arrays, act, frozen)
        new[l.index] = dataclasses.replace(l, value=node)

    weights = [p for p in plan if p.weight is not None and p.param is None]
    existing: dict[str, list] = {}
    for l in leaves:
        if is_adapted(l.value):
            for n, s in l.value.specs:
                existing.setdefault(n, []).append((l.module, s))
    # a planner that resolved fields from the tree hands back the config to build from
    config = next((p.config for p in plan if p.config is not None), config)
    specs = config.module_specs_beside(
        [(p.module, p.layout, tuple(p.weight.base.shape), p.mask) for p in weights], existing
    )
    spec_of = {id(p): s for p, s in zip(weights, specs)}
    for p in plan:  # PEFT's `target_parameters`
        if p.param is not None:
            spec_of[id(p)] = config.parameter_spec(
                p.param, p.nest, p.layout, tuple(p.weight.base.shape)
            )
    for i, item in enumerate(plan):
        mkey = jax.random.fold_in(key, i)
        if item.weight is None:  # a method that copies whole modules: every leaf
            for l in item.leaves:
                st = item.layout.stack if item.layout is not None else 0
                lay = Layout("dense", stack=st if l.base.ndim > st else 0)
                spec = config.module_spec(item.module, lay, tuple(l.base.shape), None)
                add(l, spec, spec.init(mkey, as_float(l.base)))
            continue
        w, spec = item.weight, spec_of[id(item)]
        add(w, spec, spec.init(mkey, as_float(w.base), dtype))
        b = bias_leaf(groups[item.module], w)
        companion = spec.bias_companion(tuple(b.base.shape), w.name) if b is not None else None
        if b is not None and companion is not None:
            add(b, companion, {})
    for mod in save_paths:
        for l in subtree_leaves(groups, mod):
            spec = modules_to_save_spec(tuple(l.base.shape))
            add(l, spec, spec.init(None, as_float(l.base)))
    return new


def _with_active(l: Leaf, act: tuple[str, ...]) -> Leaf:
    if is_adapted(l.value) and l.value.active != act:
        return dataclasses.replace(l, value=l.value.replace(active=act))
    return l


# ---------------------------------------------------------------------------------- activity


def set_active(params, names: str | Sequence[str] | None):
    """Activate ``names`` (a str, a list of str, or ``None`` / ``[]`` for base behaviour).

    As PEFT's ``set_adapter``: on a tree with merged adapters, every merged adapter is
    unmerged first (with a warning), then ``names`` become active (unmerged).

    Args:
      params: the adapter-carrying tree.
      names: the adapters to activate, in order: a str, a list of str, or ``None`` / ``[]``
        (no adapter acts: the base model).

    Returns:
      A new tree whose active adapters are ``names``.

    Raises:
      AdapterNameError: an unknown name, a name listed twice, or two adapters that each replace
        one module (LN tuning / ``modules_to_save``).
      AdapterNameTypeError: ``names`` is not a str, a list of str or ``None``.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> p = pj.inject(p, cfg, key=1, name="other")
      >>> pj.active(p), pj.active(pj.set_active(p, ["default", "other"]))
      (('default',), ('default', 'other'))
    """
    names = names_arg(names, "names")
    check_names(params, names, "names")
    if len(set(names)) != len(names):
        raise AdapterNameError(f"`names`: {list(names)} lists an adapter twice.")
    leaves, treedef = walk(params)
    for l in leaves:
        if is_adapted(l.value):
            copies = [n for n in names if n in l.value.names and l.value.spec(n).role == COPY]
            if len(copies) > 1:
                raise AdapterNameError(
                    f"`names`: adapters {copies} each replace module `{l.module}` (LN tuning / "
                    "modules_to_save); only one of them can be active."
                )
    if any(node.merged for node in adapted_nodes(leaves)):
        merged = sorted({n for node in adapted_nodes(leaves) for n in node.merged})
        warnings.warn(
            f"Adapter cannot be set when the model is merged. Unmerging the model first "
            f"(adapters {merged} unmerged).",
            UserWarning,
            stacklevel=2,
        )
        leaves, treedef = walk(unmerge(params))
    return rebuild(treedef, [_with_active(l, names) for l in leaves])


def set_trainable(params, names: str | Sequence[str] | None = None, trainable: bool = True):
    """Mark adapters ``names`` (default: all) trainable or frozen.

    A frozen adapter still acts (when active) but `partition`, `trainable_mask`,
    `adapter_optimizer` and `count_parameters` treat its arrays as frozen, as PEFT does for an
    adapter made with ``inference_mode=True`` (or loaded with ``is_trainable=False``).

    Args:
      params: the adapter-carrying tree.
      names: an adapter name or a list of names; ``None`` (default): every adapter.
      trainable: ``True`` to train the adapters, ``False`` to freeze them.

    Returns:
      A new tree with the adapters marked; arrays and active set unchanged.

    Raises:
      AdapterNameError: an unknown name in ``names``.
      AdapterNameTypeError: ``names`` is not a str, a list of str or ``None``.
      ArgumentTypeError: ``trainable`` is not a bool.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> pj.count_parameters(p), pj.count_parameters(pj.set_trainable(p, "default", False))
      ((14, 26), (0, 26))
    """
    if not isinstance(trainable, (bool, np.bool_)):
        raise ArgumentTypeError(f"`trainable`: expected a bool, got {trainable!r}.")
    names = adapter_names(params) if names is None else names_arg(names, "names")
    check_names(params, names, "names")
    leaves, treedef = walk(params)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            mine = [n for n in names if n in node.names]
            if trainable:
                fz = tuple(n for n in node.frozen if n not in mine)
            else:
                fz = node.frozen + tuple(n for n in mine if n not in node.frozen)
            l = dataclasses.replace(l, value=node.replace(frozen=fz))
        out.append(l)
    return rebuild(treedef, out)


def frozen_adapters(params) -> tuple[str, ...]:
    """Names of the adapters marked frozen (`set_trainable`, ``inference_mode=True``).

    Args:
      params: any pytree; its adapter-carrying weights (`Adapted` nodes) are read.

    Returns:
      A tuple of adapter names, in `adapter_names` order (``()`` when none is frozen).

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> p = pj.inject(p, cfg, key=1, name="other", trainable=False)
      >>> pj.frozen_adapters(p), pj.frozen_adapters(pj.set_trainable(p))
      (('other',), ())
    """
    fz = {n for node in adapted_nodes(walk(params)[0]) for n in node.frozen}
    return tuple(n for n in adapter_names(params) if n in fz)


def delete(params, name: str):
    """Remove adapter ``name`` everywhere. If it was active, the other active ones stay active;
    if none remain, the first of the sorted remaining names becomes active (as PEFT).

    Args:
      params: the adapter-carrying tree.
      name: the adapter to remove.

    Returns:
      A new tree without ``name``; a weight left with no adapter is a plain array again.

    Raises:
      AdapterNameError: ``params`` has no adapter ``name``.
      AdapterNameTypeError: ``name`` is not a str.
      MergeError: ``name`` is merged (`unmerge` it first).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> p = pj.delete(pj.inject(p, cfg, key=1, name="other"), "default")
      >>> pj.adapter_names(p), pj.active(p)
      (('other',), ('other',))
      >>> type(pj.delete(p, "other")["fc"]["kernel"]).__name__
      'ArrayImpl'
    """
    check_names(params, [name], "name")
    leaves, treedef = walk(params)
    for l in leaves:
        if is_adapted(l.value) and name in l.value.merged:
            raise MergeError(
                f"adapter {name!r} is merged into `{l.module}`; `pj.unmerge` before deleting it."
            )
    prior = global_active(leaves)
    remaining = [n for n in adapter_names(params) if n != name]
    act = tuple(n for n in prior if n != name)
    if name in prior and not act and remaining:
        act = (sorted(remaining)[0],)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            if name in node.names:
                specs = tuple((n, s) for n, s in node.specs if n != name)
                arrays = {n: a for n, a in node.arrays.items() if n != name}
                frozen = tuple(n for n in node.frozen if n != name)
                node = (
                    node.replace(specs=specs, arrays=arrays, frozen=frozen) if specs else node.base
                )
            if is_adapted(node):
                node = node.replace(active=act)
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return rebuild(treedef, out)


# ---------------------------------------------------------------------------------- merging


@functools.partial(jax.jit, static_argnums=0)
def _merge_kernel(spec: Spec, w32, arrays):
    return spec.merge(w32, arrays)


@functools.partial(jax.jit, static_argnums=0)
def _unmerge_kernel(spec: Spec, w32, arrays):
    return spec.unmerge(w32, arrays)


def owner_of(group: list[Leaf], spec, name: str):
    """``(spec, arrays)`` of adapter ``name`` on the sibling leaf a `DERIVED` spec follows."""
    for l in group:
        if l.name == spec.owner and is_adapted(l.value) and name in l.value.names:
            return l.value.spec(name), l.value.arrays[name]
    raise MergeError(f"adapter {name!r}: the leaf `{spec.owner}` it follows is not in the module")


def with_shared(
    groups: dict[str, list[Leaf]], spec: Spec, name: str, arrays: dict, near: str | None = None
) -> dict:
    """``arrays`` of adapter ``name`` with the `Spec.shared` arrays of its holder leaf added
    (VeRA's projections live on one leaf per adapter); ``arrays`` itself otherwise. ``near``:
    the module path of the leaf asking (it picks the holder of its own tree, `_holder_leaf`)."""
    holder = spec.shared_holder()
    if holder is None:
        return arrays
    own = _holder_leaf(groups, spec, name, holder, near).value.arrays[name]
    return {**arrays, **{k: own[k] for k in spec.shared if k in own}}


def _holder_leaf(groups: dict[str, list[Leaf]], spec: Spec, name: str, holder: str, near):
    """The leaf that holds adapter ``name``'s shared arrays: at module ``holder`` (its path in
    the tree `inject` saw), or, in a tree rooted elsewhere (`pj.apply` walks ``(args,
    kwargs)``: ``0.0.<path>``; a subtree of the injected tree), at the module whose path ends
    with ``holder`` (or that ``holder`` ends with) and, when several do (the same adapter in
    two argument trees), the one whose prefix ``near`` shares."""

    def holds(l: Leaf) -> bool:
        node = l.value
        if not is_adapted(node) or name not in node.names:
            return False
        a = node.arrays.get(name)
        return node.spec(name).shared_holder() is None and isinstance(a, dict) and bool(a)

    hits = [l for l in groups.get(holder, ()) if holds(l)]
    if not hits:
        tail = "." + holder
        hits = [
            l
            for m, g in groups.items()
            if m.endswith(tail) or holder.endswith("." + m)
            for l in g
            if holds(l)
        ]
        if len(hits) > 1 and near is not None:
            mine = [
                l
                for l in hits
                if l.module.endswith(tail) and near.startswith(l.module[: -len(tail)] + ".")
            ]
            hits = mine or hits
    if len(hits) == 1 or (hits and hits[0].module == holder):
        return hits[0]
    if not hits:
        raise MergeError(
            f"adapter {name!r}: module `{holder}`, which holds its shared arrays "
            f"({', '.join(sorted(spec.shared))}), is not in the tree; pass the whole tree the "
            "adapter was injected into."
        )
    raise MergeError(
        f"adapter {name!r}: several modules could hold its shared arrays "
        f"({', '.join(sorted(spec.shared))}): {sorted({l.module for l in hits})}; rename the "
        "adapter in one of the trees."
    )


def _fold(node: Adapted, group, names, undo: bool, groups=None):
    """New (base, arrays) of one node after merging (or unmerging) ``names`` in order."""
    base = node.base
    arrays = dict(node.arrays)
    w = None
    for n in names:
        spec = node.spec(n)
        if spec.role == COPY:
            if w is not None:
                base, w = w.astype(base.dtype), None
            base, arrays[n] = spec.merge(base, arrays[n])
            continue
        if w is None:
            w = base.astype(jnp.float32)
        if spec.role == DERIVED:
            derived: Any = spec  # a derived spec (IA3's bias) computes its value from its owner
            w = derived.derived_value(w, *owner_of(group, spec, n), undo=undo)
            continue
        fn = _unmerge_kernel if undo else _merge_kernel
        near = group[0].module if group else None
        full = with_shared(groups or {}, spec, n, arrays[n], near)
        w, out = fn(spec, w, full)
        arrays[n] = {k: v for k, v in out.items() if k in arrays[n] or k not in full}
    if w is not None:
        base = w.astype(node.base.dtype)
    return base, arrays


def merge(params, names: str | Sequence[str] | None = None, *, safe: bool = False):
    """Fold the active (or named) adapters into the base weights, recording them for `unmerge`.

    Already-merged adapters are skipped with PEFT's warning (``check_adapters_to_merge``);
    adapters merge in the order given. Deltas are computed in float32 and cast once to the base
    dtype. Disabled params (`pj.disable_adapters`) are refused: `pj.enable_adapters` first.

    Args:
      params: the adapter-carrying tree.
      names: the adapters to merge, in order: a str or a list of str; ``None`` (default): the
        active adapters.
      safe: raise `MergeError` naming the module if any merged value is not finite; nothing is
        returned half-merged.

    Returns:
      A new tree whose base weights hold the merged adapters, which stay recorded (as
      ``merged``) so that `unmerge` can take them out; `pj.apply` gives the same outputs.

    Raises:
      AdapterNameError: an unknown name, or a name listed twice, in ``names``.
      AdapterNameTypeError: ``names`` is not a str, a list of str or ``None``.
      ArgumentTypeError: ``safe`` is not a bool.
      MergeError: disabled params, a prompt-learning adapter, a quantized base weight (use
        `merge_and_unload`), a VeRA adapter whose shared arrays are not in the tree, or (with
        ``safe=True``) a non-finite result or traced weights.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False), key=0)
      >>> m = pj.merge(p)
      >>> m["fc"]["kernel"].merged
      ('default',)
      >>> f = pj.apply(lambda p, x: x @ p["fc"]["kernel"])
      >>> bool(jnp.allclose(f(p, jnp.ones((2, 4))), f(m, jnp.ones((2, 4))), atol=1e-5))
      True
    """
    if not isinstance(safe, (bool, np.bool_)):
        raise ArgumentTypeError(f"`safe`: expected a bool, got {safe!r}.")
    leaves, treedef = walk(params)
    names = global_active(leaves) if names is None else names_arg(names, "names")
    check_names(params, names, "names")
    if len(set(names)) != len(names):  # would fold the same delta in twice
        raise AdapterNameError(f"`names`: {list(names)} lists an adapter twice.")
    if safe:
        traced = [
            l.module
            for l in leaves
            if is_adapted(l.value)
            and any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(l.value))
        ]
        if traced:
            raise MergeError(
                f"`merge(safe=True)` checks the merged values, so it needs concrete arrays, but "
                f"the weights of `{traced[0]}` are traced (inside `jax.jit`, `grad`, `vmap`...): "
                "call `pj.merge(..., safe=True)` outside the transform, or merge without `safe` "
                "and check `jnp.isfinite` on the result yourself."
            )
    if any(node.disabled for node in adapted_nodes(leaves)):
        raise MergeError(
            "`merge`: the adapters are disabled (`pj.disable_adapters`), and merged adapters "
            "would act through the base weights; `pj.enable_adapters` first (`pj.merge_and_unload` "
            "merges the active adapters of disabled params, as PEFT's does)."
        )
    _refuse_prompt_merge(leaves, names)
    _refuse_quantized_merge(leaves, names)
    _warn_merged(leaves, names)
    groups = group_modules(leaves)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            todo = [n for n in names if n in node.names and n not in node.merged]
            if todo:
                base, arrays = _fold(node, groups[l.module], todo, undo=False, groups=groups)
                if safe and not bool(jnp.all(jnp.isfinite(base))):
                    raise MergeError(
                        f"safe merge: merging {todo} into `{l.module}` ({l.name}) gives non-finite "
                        "values; nothing was merged."
                    )
                node = node.replace(base=base, arrays=arrays, merged=node.merged + tuple(todo))
                node = _keep_sharding(node, l)
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return rebuild(treedef, out)


def _refuse_prompt_merge(leaves, names) -> None:
    """Prompt-learning adapters act on activations: there is no weight to fold them into (PEFT
    has no merge for them either)."""
    for node in adapted_nodes(leaves):
        for n, spec in node.specs:
            if n in names and spec.role == PROMPT:
                raise MergeError(
                    f"adapter {n!r} is {spec.method}, a prompt-learning method: it acts on the "
                    "activations (virtual tokens, attention keys and values), not on a weight, so "
                    "it cannot be merged (PEFT refuses as well). Merge the other adapters by name "
                    "(`pj.merge(params, names=[...])`), or `pj.unload` / `pj.delete` it."
                )


def _refuse_quantized_merge(leaves, names) -> None:
    """`merge` keeps the base's storage, and a 4-bit / int8 base cannot hold ``W + dW`` (nor
    give it back exactly to `unmerge`): refuse, naming the module."""
    for l in leaves:
        node = l.value
        if is_adapted(node) and is_quantized(node.base) and any(n in node.names for n in names):
            raise MergeError(
                f"`merge`: the base weight of `{l.module}` is quantized ({node.base!r}); folding "
                "an adapter into it could not be undone. Use `pj.merge_and_unload(params)` (a "
                "float tree; `requantize=True` quantizes the merged weights again) or "
                "`pj.dequantize(params)` first."
            )


def _keep_sharding(node: Adapted, l: Leaf) -> Adapted:
    """``node`` (merged or unmerged from ``l``) with its base on the sharding of ``l``'s base and
    its arrays where the mesh rule puts them (`peftjax.sharding`): a merge on a mesh changes no
    leaf's sharding."""
    old = l.value.base
    if not isinstance(old, jax.Array) or isinstance(old, jax.core.Tracer):
        return node
    return place_node(node, l.module, base_sharding=old.sharding)


def _warn_merged(leaves, names) -> None:
    """PEFT's ``check_adapters_to_merge`` warnings, once per distinct message: a module that
    already has merged adapters merges only the others."""
    msgs: dict[str, None] = {}
    for node in adapted_nodes(leaves):
        if node.merged:
            rest = [n for n in names if n not in node.merged]
            if rest:
                msg = (
                    f"Already following adapters were merged {','.join(node.merged)}. "
                    f"You are now additionally merging {','.join(rest)}."
                )
            else:
                msg = "All adapters are already merged, nothing to do."
            msgs[msg] = None
    for msg in msgs:
        warnings.warn(msg, UserWarning, stacklevel=3)


def unmerge(params):
    """Undo `merge`: every merged adapter is taken out, last merged first.

    Args:
      params: the adapter-carrying tree, with merged adapters.

    Returns:
      A new tree with no merged adapter; each base weight is back to its value before `merge`
      (up to float rounding), in its own dtype.

    Raises:
      MergeError: no adapter is merged, or a merged VeRA adapter's shared arrays are not in
        the tree.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False), key=0)
      >>> u = pj.unmerge(pj.merge(p))
      >>> u["fc"]["kernel"].merged, bool(jnp.allclose(u["fc"]["kernel"].base, 1.0, atol=1e-6))
      ((), True)
    """
    leaves, treedef = walk(params)
    if not any(node.merged for node in adapted_nodes(leaves)):
        raise MergeError("`unmerge`: no adapter is merged.")
    groups = group_modules(leaves)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node) and node.merged:
            base, arrays = _fold(
                node, groups[l.module], tuple(reversed(node.merged)), undo=True, groups=groups
            )
            node = _keep_sharding(node.replace(base=base, arrays=arrays, merged=()), l)
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return rebuild(treedef, out)


def constrain(params):
    """Every adapter's arrays with its method's constraint applied (`Spec.constrain`): PEFT
    rewrites constrained parameters (OFT's COFT projection) in place before each forward, so
    calling this after each optimizer step trains as PEFT does. Identity for other methods.

    Args:
      params: the adapter-carrying tree (or the ``trainable`` half of `pj.partition`).

    Returns:
      A new tree of the same structure, the constrained arrays replaced.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.OFTConfig(r=0, oft_block_size=2, target_modules=["fc"], coft=True, eps=1e-3,
      ...                    init_weights=False)
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> big = jax.tree_util.tree_map(lambda x: 100 * x, p)  # as if a large step was taken
      >>> norm = lambda q: float(jnp.linalg.norm(q["fc"]["kernel"].arrays["default"]["oft_R"]))
      >>> norm(big) > 1e-2, norm(pj.constrain(big)) < 1e-3
      (True, True)
    """
    leaves, treedef = walk(params)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            arrays = {n: node.spec(n).constrain(a) for n, a in node.arrays.items()}
            l = dataclasses.replace(l, value=node.replace(arrays=arrays))
        out.append(l)
    return rebuild(treedef, out)


def _strip(params):
    leaves, treedef = walk(params)
    return jax.tree_util.tree_unflatten(
        treedef, [l.value.base if is_adapted(l.value) else l.value for l in leaves]
    )


def merge_and_unload(
    params,
    names: str | Sequence[str] | None = None,
    *,
    safe: bool = False,
    requantize: bool = False,
):
    """Merge the active (or named) adapters and return a plain tree with exactly the original
    structure, shapes and dtypes. Disabled params (`pj.disable_adapters`) merge their active
    adapters all the same, as PEFT's ``merge_and_unload`` inside ``disable_adapter()``.

    Quantized bases (`pj.quantize`) are dequantized and merged in float32 (as PEFT's merge of a
    bitsandbytes layer): the result is a float tree, every weight in the dtype it had before
    quantization. With ``requantize=True`` each weight that was quantized is quantized again
    with its scheme, block size and double quantization (QLoRA's merged 4-bit model).

    Args:
      params: the adapter-carrying tree.
      names: the adapters to merge, in order: a str or a list of str; ``None`` (default): the
        active adapters. Adapters already merged stay merged; the others are dropped.
      safe: raise `MergeError` naming the module if any merged value is not finite.
      requantize: quantize each weight that was quantized again after merging.

    Returns:
      A plain tree (no `Adapted` node) with the structure, shapes and dtypes of the tree the
      adapters were injected into.

    Raises:
      AdapterNameError: an unknown name, or a name listed twice, in ``names``.
      AdapterNameTypeError: ``names`` is not a str, a list of str or ``None``.
      ArgumentTypeError: ``safe`` or ``requantize`` is not a bool.
      MergeError: a prompt-learning adapter in ``names``, a VeRA adapter whose shared arrays
        are not in the tree, or (with ``safe=True``) a non-finite result or traced weights.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = pj.quantize({"q": {"kernel": jnp.ones((64, 8))}}, scheme="int8")
      >>> p = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q"]), key=jax.random.key(0))
      >>> w = pj.merge_and_unload(p)["q"]["kernel"]
      >>> type(w).__name__, w.shape, w.dtype
      ('ArrayImpl', (64, 8), dtype('float32'))
      >>> pj.merge_and_unload(p, requantize=True)["q"]["kernel"].scheme
      'int8'
    """
    if not isinstance(requantize, (bool, np.bool_)):
        raise ArgumentTypeError(f"`requantize`: expected a bool, got {requantize!r}.")
    leaves, treedef = walk(params)
    if any(node.disabled for node in adapted_nodes(leaves)):  # enabled again first
        vals = [l.value.replace(disabled=False) if is_adapted(l.value) else l.value for l in leaves]
        params = jax.tree_util.tree_unflatten(treedef, vals)
        leaves, treedef = walk(params)
    quant = {}
    for l in leaves:
        q = l.value.base if is_adapted(l.value) else l.value
        if is_quantized(q):
            quant[l.index] = q
    if quant:
        params = dequantize(params)
    out = _strip(merge(params, names, safe=safe))
    if not (quant and requantize):
        return out
    leaves, treedef = walk(out)
    vals = [l.value for l in leaves]
    for i, q in quant.items():
        vals[i] = quantize_array(
            vals[i],
            scheme=q.scheme,
            block_size=q.block_size,
            double_quant=q.double_quant,
            where=".".join(leaves[i].names),
        )
    return jax.tree_util.tree_unflatten(treedef, vals)


def unload(params):
    """The original base tree, adapters dropped (merged adapters are unmerged first).

    Args:
      params: the adapter-carrying tree.

    Returns:
      A plain tree (no `Adapted` node) with the structure, shapes and dtypes of the tree the
      adapters were injected into.

    Raises:
      MergeError: a merged VeRA adapter's shared arrays are not in the tree (it cannot be
        unmerged).

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
      >>> p = pj.inject(base, pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> out = pj.unload(pj.merge(p))
      >>> jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(base)
      True
      >>> bool(jnp.allclose(out["fc"]["kernel"], base["fc"]["kernel"]))
      True
    """
    if any(node.merged for node in adapted_nodes(walk(params)[0])):
        params = unmerge(params)
    return _strip(params)
