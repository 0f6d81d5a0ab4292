"""The pure transforms: inject, set_active, delete, merge, unmerge, merge_and_unload, unload,
and the queries. None of them modifies its input; each returns a new tree.

Module paths: a leaf named ``kernel``, ``embedding``, ``weight``, ``w``, ``bias``, ``b`` or
``scale`` (or any leaf with fewer than 2 dims) belongs to the module of its parent dict, whose
dotted path (leading linen ``params`` collection dropped) is the module path. Any other array leaf
with 2 or more dims is a module of its own, named by its full path (plain trees like
``{"q": W_q, "k": W_k}``).
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
from .layout import Layout, LayoutSpec, resolve_layout
from .methods import CopySpec, IA3BiasSpec, IA3Spec, LoHaSpec, LoKrSpec, LoraSpec, Spec
from .node import Adapted, is_adapted, leaves_with_paths

WEIGHT_NAMES = ("kernel", "weight", "embedding", "w")
BIAS_NAMES = ("bias", "b")
# Leaves that belong to their parent dict's module whatever their rank: a DenseGeneral bias
# (heads, head_dim) or a scanned layer's bias / norm scale (L, features) is not a module.
MEMBER_NAMES = WEIGHT_NAMES + BIAS_NAMES + ("scale",)
ADAPTABLE = {
    "lora": ("dense", "conv", "embed"),
    "loha": ("dense", "conv"),
    "lokr": ("dense", "conv"),
    "ia3": ("dense", "conv"),
}


# ---------------------------------------------------------------------------------- walking


@dataclasses.dataclass
class _Leaf:
    index: int
    names: tuple[str, ...]
    name: str  # leaf name
    module: str  # module path
    value: Any  # array or Adapted

    @property
    def base(self):
        return self.value.base if is_adapted(self.value) else self.value


def _dotted(names: Sequence[str]) -> str:
    names = list(names)
    if names and names[0] == "params":
        names = names[1:]
    return ".".join(names)


def _walk(params) -> tuple[list[_Leaf], Any]:
    flat, treedef = leaves_with_paths(params)
    leaves = []
    for i, (kp, leaf) in enumerate(flat):
        names = P.keypath_to_names(kp)
        name = names[-1] if names else ""
        base = leaf.base if is_adapted(leaf) else leaf
        ndim = len(getattr(base, "shape", ()))
        own = name not in MEMBER_NAMES and ndim >= 2
        module = _dotted(names[:-1])
        if own or not module:  # a weight at the root is a module of its own
            module = _dotted(names)
        leaves.append(_Leaf(i, names, name, module, leaf))
    return leaves, treedef


def _rebuild(treedef, leaves: list[_Leaf]):
    # every node of the result is a new object with its own `arrays` dicts (`Adapted` copies
    # them), even where a transform left it as it was: no tree shares a container with another
    vals = [l.value.replace() if is_adapted(l.value) else l.value for l in leaves]
    return jax.tree_util.tree_unflatten(treedef, vals)


def _modules(leaves: list[_Leaf]) -> dict[str, list[_Leaf]]:
    out: dict[str, list[_Leaf]] = {}
    for l in leaves:
        out.setdefault(l.module, []).append(l)
    return out


def _weight_leaf(group: list[_Leaf]) -> _Leaf | None:
    arrays = [l for l in group if len(getattr(l.base, "shape", ())) >= 2]
    for wname in WEIGHT_NAMES:
        for l in arrays:
            if l.name == wname:
                return l
    own = [l for l in arrays if l.name not in MEMBER_NAMES]
    return own[0] if len(own) == 1 else None


def _bias_leaf(group: list[_Leaf], weight: _Leaf) -> _Leaf | None:
    for l in group:
        if l is not weight and l.name in BIAS_NAMES:
            return l
    return None


def _nodes(leaves):
    return [l.value for l in leaves if is_adapted(l.value)]


def _global_active(leaves) -> tuple[str, ...]:
    nodes = _nodes(leaves)
    return nodes[0].active if nodes else ()


def adapter_names(params) -> tuple[str, ...]:
    """Names of the adapters in ``params``, in the order they were injected.

    Each node lists its adapters in injection order; the lists are merged (a topological
    order, ties broken by first appearance in the tree), so an adapter injected later is never
    listed before an earlier one that shares a module with it. The order of adapters that share
    no module (directly or through others) is not recorded and follows the tree.
    """
    seen: dict[str, None] = {}
    after: dict[str, set[str]] = {}
    for node in _nodes(_walk(params)[0]):
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
    """The active adapter names (``()`` when adapters are off or there are none)."""
    return _global_active(_walk(params)[0])


def targeted_modules(params, name: str | None = None) -> list[str]:
    """Sorted module paths carrying adapter ``name`` (any adapter when ``None``)."""
    if name is not None:
        _check_names(params, [name], "name")
    mods = set()
    for l in _walk(params)[0]:
        if is_adapted(l.value) and (name is None or name in l.value.names):
            mods.add(l.module)
    return sorted(mods)


def _names_arg(names, field: str) -> tuple[str, ...]:
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


def _check_names(params, names, field: str):
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


def _specs_for(config: AdapterConfig, module: str, layout: Layout, shape, mask, r, alpha) -> Spec:
    """The static spec of one adapter on one weight."""
    nl = int(np.prod(layout.stack_shape(shape))) if layout.stack else 1
    method = config.method
    if method in ("lora", "loha", "lokr"):
        s = config.scaling(r, alpha) if method == "lora" else alpha / r
    else:
        s = 1.0
    scaling = tuple(float(s) if on else 0.0 for on in (mask if mask is not None else [True] * nl))
    # a stacked weight with some slices excluded stores only the others (compact, see Spec)
    layers = None if mask is None or all(mask) else tuple(i for i, on in enumerate(mask) if on)
    common = dict(layout=layout, shape=tuple(shape), scaling=scaling, layers=layers)
    if method == "lora":
        return LoraSpec(
            **common,
            r=r,
            use_dora=config.use_dora,
            lora_dropout=float(config.lora_dropout),
            init_weights=config.init_lora_weights,
        )
    if method == "loha":
        return LoHaSpec(
            **common,
            r=r,
            rank_dropout=float(config.rank_dropout),
            module_dropout=float(config.module_dropout),
            init_weights=config.init_weights,
            effective_conv=bool(config.use_effective_conv2d)
            and layout.kind == "conv"
            and _ksize(layout, shape) > 1,
        )
    if method == "lokr":
        return LoKrSpec(
            **common,
            r=r,
            decompose_both=config.decompose_both,
            decompose_factor=config.decompose_factor,
            rank_dropout=float(config.rank_dropout),
            module_dropout=float(config.module_dropout),
            rank_dropout_scale=config.rank_dropout_scale,
            init_weights=config.init_weights,
            use_effective_conv2d=bool(config.use_effective_conv2d),
        )
    if method == "ia3":
        ff = config.feedforward_modules
        is_ff = bool(ff) and P.suffix_match(module, ff, "feedforward_modules")
        return IA3Spec(**common, feedforward=is_ff, init_weights=config.init_ia3_weights)
    raise ConfigError(f"unknown method {method!r}")


def _ksize(layout: Layout, shape) -> int:
    return int(np.prod(layout.spatial(shape)))


def _layer_mask(config, module: str, layout: Layout, shape):
    """Per-layer on/off for stacked weights with ``layers_to_transform``."""
    ltt = getattr(config, "layers_to_transform", None)
    if ltt is None or not layout.stack:
        return None
    n = int(np.prod(layout.stack_shape(shape)))
    wanted = {ltt} if isinstance(ltt, int) else set(ltt)
    return [i in wanted for i in range(n)]


def _validate_name(name, leaves):
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"`name` must be a non-empty str, got {name!r}.")
    for node in _nodes(leaves):
        if name in node.names:
            raise AdapterNameError(
                f"`name`: an adapter named {name!r} already exists; pick another name or "
                "`pj.delete` it first."
            )


def _new_node(
    l: _Leaf, name: str, spec: Spec, arrays, act: tuple[str, ...], frozen: bool = False
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


def _check_layout_keys(layouts, groups: dict[str, list[_Leaf]]) -> None:
    """Every key of a ``layouts`` dict must match some module (resolve_layout's rule)."""
    if layouts is None or isinstance(layouts, Layout) or callable(layouts):
        return
    if not isinstance(layouts, Mapping):
        raise ArgumentTypeError(
            "`layouts`: expected a `pj.Layout`, a dict {module regex or suffix: Layout} or a "
            f"callable (module_path, array) -> Layout | None, got {type(layouts).__name__}."
        )
    mods = [m for m, g in groups.items() if m and _weight_leaf(g) is not None] or [
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
      config: a `LoraConfig`, `LoHaConfig`, `LoKrConfig`, `IA3Config` or `LNTuningConfig`.
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

    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> p = {"q_proj": {"kernel": jnp.ones((4, 6))}}
    >>> p2 = pj.inject(p, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0))
    >>> pj.targeted_modules(p2)
    ['q_proj']
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
        return jax.eval_shape(lambda p: inject(p, config, key=key, **kw), params)
    leaves, treedef = _walk(params)
    _validate_name(name, leaves)
    groups = _modules(leaves)
    _check_layout_keys(layouts, groups)
    method = config.method
    if config.target_modules is None:
        raise ConfigError(
            "`target_modules=None`: peftjax has no per-architecture default; name the modules, "
            "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
        )

    mts = getattr(config, "modules_to_save", None)
    if method == "ln_tuning":
        candidates = [m for m in groups if m]
    else:
        candidates = [m for m, g in groups.items() if _weight_leaf(g) is not None]
    save_paths = P.select_modules_to_save(list(groups), mts) if mts else []
    linear = None
    if P.is_all_linear(config.target_modules):
        items = [
            (m, w.name, _linear_ndim(layouts, m, w))
            for m in candidates
            if (w := _weight_leaf(groups[m]))
        ]
        linear = P.select_all_linear(items, task_type=getattr(config, "task_type", None))
    ltt = getattr(config, "layers_to_transform", None)
    lpat = getattr(config, "layers_pattern", None)
    selected = P.select_modules(
        candidates,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=save_paths,
        linear_modules=linear,
        forbid_with_str_target=False,
    )

    # Resolve layouts first (errors name the module), then the layer filter.
    plan = []
    for mod in selected:
        group = groups[mod]
        if method == "ln_tuning":
            # A copy is taken whole (LN tuning has no per-layer filter), so `layouts` (which
            # describe matrix views, and need not fit a 1-D or stacked norm) do not apply.
            plan.append((mod, group, None))
            continue
        w = _weight_leaf(group)
        lay = resolve_layout(layouts, mod, w.name, w.base)
        if lay.kind not in ADAPTABLE[method]:
            raise UnsupportedModuleError(
                f"module `{mod}`: {method} cannot adapt a {lay.kind} weight (shape "
                f"{tuple(w.base.shape)}); it adapts {', '.join(ADAPTABLE[method])} weights."
            )
        plan.append((mod, w, lay))
    if ltt is not None and not isinstance(config.target_modules, str):
        # PEFT's layer filter (list targets only); stacked weights are filtered per layer slice.
        plan = [
            item
            for item in plan
            if (
                item[2] is not None
                and item[2].stack
                and any(_layer_mask(config, item[0], item[2], item[1].base.shape))
            )  # a stacked weight with no selected layer slice is not adapted
            or P.matches_target(
                item[0], config.target_modules, layers_to_transform=ltt, layers_pattern=lpat
            )
        ]
        if not plan:
            raise TargetError(
                f"`layers_to_transform={ltt!r}`"
                + (f" with `layers_pattern={lpat!r}`" if lpat else "")
                + f" left no module among the targeted ones: {selected[:5]}."
            )

    rank_pattern = getattr(config, "rank_pattern", {}) or {}
    alpha_pattern = getattr(config, "alpha_pattern", {}) or {}
    targeted = [item[0] for item in plan]
    if rank_pattern:
        P.check_pattern_keys(targeted, rank_pattern, "rank_pattern")
    if alpha_pattern:
        P.check_pattern_keys(targeted, alpha_pattern, "alpha_pattern")

    frozen = not trainable
    prior = _global_active(leaves)
    first = not _nodes(leaves)
    do_activate = first if activate is None else activate
    act = (prior + (name,)) if do_activate and name not in prior else prior

    new = list(leaves)
    for i, (mod, item, lay) in enumerate(plan):
        mkey = jax.random.fold_in(key, i)
        if method == "ln_tuning":
            for l in item:
                spec = CopySpec(
                    layout=lay or Layout("dense", stack=0),
                    shape=tuple(l.base.shape),
                    scaling=tuple(
                        1.0 if on else 0.0
                        for on in (_layer_mask(config, mod, lay, l.base.shape) or [True])
                    )
                    if lay and lay.stack
                    else (1.0,),
                    kind="ln_tuning",
                )
                new[l.index] = dataclasses.replace(
                    l, value=_new_node(l, name, spec, spec.init(mkey, l.base), act, frozen)
                )
            continue
        w = item
        r = int(P.get_pattern_value(mod, rank_pattern, getattr(config, "r", 1)))
        alpha = P.get_pattern_value(
            mod, alpha_pattern, getattr(config, "lora_alpha", getattr(config, "alpha", 1))
        )
        mask = _layer_mask(config, mod, lay, w.base.shape)
        try:
            spec = _specs_for(config, mod, lay, w.base.shape, mask, r, alpha)
        except UnsupportedModuleError as err:  # a spec's own shape check: name the module
            raise UnsupportedModuleError(f"module `{mod}`: {err}") from None
        arrays = spec.init(mkey, w.base, dtype)
        new[w.index] = dataclasses.replace(w, value=_new_node(w, name, spec, arrays, act, frozen))
        if isinstance(spec, IA3Spec) and not spec.feedforward:
            b = _bias_leaf(groups[mod], w)
            if b is not None:
                bspec = IA3BiasSpec(
                    layout=Layout("dense", stack=lay.stack),
                    shape=tuple(b.base.shape),
                    scaling=spec.scaling,
                    owner=w.name,
                )
                new[b.index] = dataclasses.replace(
                    b, value=_new_node(b, name, bspec, {}, act, frozen)
                )
    for mod in save_paths:
        for l in _subtree(groups, mod):
            spec = CopySpec(
                layout=Layout("dense"),
                shape=tuple(l.base.shape),
                scaling=(1.0,),
                kind="modules_to_save",
            )
            new[l.index] = dataclasses.replace(
                l,
                value=_new_node(new[l.index], name, spec, spec.init(None, l.base), act, frozen),
            )
    new = [_with_active(l, act) for l in new]
    return _rebuild(treedef, new)


def _linear_ndim(layouts: LayoutSpec, mod: str, w: _Leaf) -> int:
    """A weight's ndim as ``"all-linear"`` sees it: 2 for a kernel that ``layouts`` reads as one
    dense matrix per layer (stacked or DenseGeneral kernels are Linear layers), else its own."""
    if layouts:
        try:
            if resolve_layout(layouts, mod, w.name, w.base).kind == "dense":
                return 2
        except UnsupportedModuleError:
            pass
    return w.base.ndim


def _str_tuple(t) -> tuple[str, ...]:
    return tuple(t) if not isinstance(t, str) else (t,)


def _subtree(groups, mod: str) -> list[_Leaf]:
    out = []
    for m, g in groups.items():
        if m == mod or m.startswith(mod + "."):
            out.extend(g)
    return out


def _with_active(l: _Leaf, act: tuple[str, ...]) -> _Leaf:
    if is_adapted(l.value) and l.value.active != act:
        return dataclasses.replace(l, value=l.value.replace(active=act))
    return l


# ---------------------------------------------------------------------------------- activity


def set_active(params, names: str | Sequence[str] | None):
    """Activate ``names`` (a str, a list of str, or ``None`` / ``[]`` for base behaviour).

    As PEFT's ``set_adapter``: on a tree with merged adapters, every merged adapter is
    unmerged first (with a warning), then ``names`` become active (unmerged).
    """
    names = _names_arg(names, "names")
    _check_names(params, names, "names")
    if len(set(names)) != len(names):
        raise AdapterNameError(f"`names`: {list(names)} lists an adapter twice.")
    leaves, treedef = _walk(params)
    for l in leaves:
        if is_adapted(l.value):
            copies = [
                n for n in names if n in l.value.names and isinstance(l.value.spec(n), CopySpec)
            ]
            if len(copies) > 1:
                raise AdapterNameError(
                    f"`names`: adapters {copies} each replace module `{l.module}` (LN tuning / "
                    "modules_to_save); only one of them can be active."
                )
    if any(node.merged for node in _nodes(leaves)):
        merged = sorted({n for node in _nodes(leaves) for n in node.merged})
        warnings.warn(
            f"Adapter cannot be set when the model is merged. Unmerging the model first "
            f"(adapters {merged} unmerged).",
            UserWarning,
            stacklevel=2,
        )
        leaves, treedef = _walk(unmerge(params))
    return _rebuild(treedef, [_with_active(l, names) for l in leaves])


def set_trainable(params, names: str | Sequence[str] | None = None, trainable: bool = True):
    """Mark adapters ``names`` (default: all) trainable or frozen.

    A frozen adapter still acts (when active) but `partition`, `trainable_mask`,
    `adapter_optimizer` and `count_parameters` treat its arrays as frozen, as PEFT does for an
    adapter made with ``inference_mode=True`` (or loaded with ``is_trainable=False``).
    """
    if not isinstance(trainable, (bool, np.bool_)):
        raise ArgumentTypeError(f"`trainable`: expected a bool, got {trainable!r}.")
    names = adapter_names(params) if names is None else _names_arg(names, "names")
    _check_names(params, names, "names")
    leaves, treedef = _walk(params)
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
    return _rebuild(treedef, out)


def frozen_adapters(params) -> tuple[str, ...]:
    """Names of the adapters marked frozen (`set_trainable`, ``inference_mode=True``)."""
    fz = {n for node in _nodes(_walk(params)[0]) for n in node.frozen}
    return tuple(n for n in adapter_names(params) if n in fz)


def delete(params, name: str):
    """Remove adapter ``name`` everywhere. If it was active, the other active ones stay active;
    if none remain, the first of the sorted remaining names becomes active (as PEFT)."""
    _check_names(params, [name], "name")
    leaves, treedef = _walk(params)
    for l in leaves:
        if is_adapted(l.value) and name in l.value.merged:
            raise MergeError(
                f"adapter {name!r} is merged into `{l.module}`; `pj.unmerge` before deleting it."
            )
    prior = _global_active(leaves)
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
    return _rebuild(treedef, out)


# ---------------------------------------------------------------------------------- merging


@functools.partial(jax.jit, static_argnums=0)
def _merge_kernel(spec: Spec, w32, arrays):
    return spec.merge(w32, arrays)


@functools.partial(jax.jit, static_argnums=0)
def _unmerge_kernel(spec: Spec, w32, arrays):
    return spec.unmerge(w32, arrays)


def _ia3_bias_factor(group: list[_Leaf], bias_node: Adapted, name: str):
    spec: IA3BiasSpec = bias_node.spec(name)
    for l in group:
        if l.name == spec.owner and is_adapted(l.value) and name in l.value.names:
            o_spec, arrays = l.value.spec(name), l.value.arrays[name]
            if not o_spec.layout.stack:
                return o_spec.bias_vector(arrays, o_spec.scaling[0])
            # per layer: the layer's own ia3_l, or ones where layers_to_transform turned it off
            full = o_spec.expand(arrays)["ia3_l"]
            flat = {"ia3_l": full.reshape(o_spec.n_layers, -1)}
            vec = jax.vmap(o_spec.bias_vector)(flat, o_spec.scale_array())
            return vec.reshape(full.shape)
    raise MergeError(f"IA3 bias owner `{spec.owner}` not found")


def _fold(node: Adapted, group, names, undo: bool):
    """New (base, arrays) of one node after merging (or unmerging) ``names`` in order."""
    base = node.base
    arrays = dict(node.arrays)
    w = None
    for n in names:
        spec = node.spec(n)
        if isinstance(spec, CopySpec):
            if w is not None:
                base, w = w.astype(base.dtype), None
            base, arrays[n] = spec.merge(base, arrays[n])
            continue
        if w is None:
            w = base.astype(jnp.float32)
        if isinstance(spec, IA3BiasSpec):
            f = _ia3_bias_factor(group, node, n).reshape(w.shape)
            w = w / (f + 1e-8) if undo else w * f
            continue
        fn = _unmerge_kernel if undo else _merge_kernel
        w, arrays[n] = fn(spec, w, arrays[n])
    if w is not None:
        base = w.astype(node.base.dtype)
    return base, arrays


def merge(params, names: str | Sequence[str] | None = None, *, safe: bool = False):
    """Fold the active (or named) adapters into the base weights, recording them for `unmerge`.

    Already-merged adapters are skipped; adapters merge in the order given. Deltas are
    computed in float32 and cast once to the base dtype.

    Args:
      safe: raise `MergeError` naming the module if any merged value is not finite; nothing is
        returned half-merged.
    """
    if not isinstance(safe, (bool, np.bool_)):
        raise ArgumentTypeError(f"`safe`: expected a bool, got {safe!r}.")
    leaves, treedef = _walk(params)
    names = _global_active(leaves) if names is None else _names_arg(names, "names")
    _check_names(params, names, "names")
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
    groups = _modules(leaves)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            todo = [n for n in names if n in node.names and n not in node.merged]
            if todo:
                base, arrays = _fold(node, groups[l.module], todo, undo=False)
                if safe and not bool(jnp.all(jnp.isfinite(base))):
                    raise MergeError(
                        f"safe merge: merging {todo} into `{l.module}` ({l.name}) gives non-finite "
                        "values; nothing was merged."
                    )
                node = node.replace(base=base, arrays=arrays, merged=node.merged + tuple(todo))
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return _rebuild(treedef, out)


def unmerge(params):
    """Undo `merge`: every merged adapter is taken out, last merged first."""
    leaves, treedef = _walk(params)
    if not any(node.merged for node in _nodes(leaves)):
        raise MergeError("`unmerge`: no adapter is merged.")
    groups = _modules(leaves)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node) and node.merged:
            base, arrays = _fold(node, groups[l.module], tuple(reversed(node.merged)), undo=True)
            node = node.replace(base=base, arrays=arrays, merged=())
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return _rebuild(treedef, out)


def _strip(params):
    leaves, treedef = _walk(params)
    return jax.tree_util.tree_unflatten(
        treedef, [l.value.base if is_adapted(l.value) else l.value for l in leaves]
    )


def merge_and_unload(params, names: str | Sequence[str] | None = None, *, safe: bool = False):
    """Merge the active (or named) adapters and return a plain tree with exactly the original
    structure, shapes and dtypes."""
    return _strip(merge(params, names, safe=safe))


def unload(params):
    """The original base tree, adapters dropped (merged adapters are unmerged first)."""
    if any(node.merged for node in _nodes(_walk(params)[0])):
        params = unmerge(params)
    return _strip(params)
