"""Module paths and HF PEFT's module-matching rules.

A *module path* is the dotted path of the dict that holds a weight leaf: the leaf
``params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]`` lives in module
``model.layers.0.self_attn.q_proj`` (a leading linen collection ``params`` is dropped, list and
nnx integer indices become ``"0"``, ``"1"``..., the trailing ``value`` of an nnx ``Variable`` is
not part of the path). Module paths play the role of PEFT's ``named_modules()`` keys without the
``base_model.model.`` prefix, and are matched with exactly PEFT's rules
(``check_target_module_exists`` in ``peft/tuners/tuners_utils.py``), in this order:

1. ``exclude_modules``: a str is a regex ``re.fullmatch``; a collection excludes ``key == e`` or
   ``key.endswith("." + e)``.
2. Modules named in ``modules_to_save`` are never adapted: ``re.match(rf"(^|.*\\.){m}($|\\..*)",
   key)`` (a whole-segment match anywhere in the path, ``m`` used as a regex).
3. ``target_modules`` str: ``re.fullmatch(pattern, key)``; no layer filter.
4. ``target_modules`` collection: ``key in targets`` matches at once (no layer filter); otherwise
   ``key.endswith("." + t)`` for some ``t`` (multi-segment suffixes such as ``self_attn.q_proj``
   work, partial words such as ``proj`` for ``q_proj`` do not).
5. ``layers_to_transform`` (an int, or a non-empty list; an empty list means no filter) keeps the
   suffix matches whose layer index is in it. The index is the *first* one found by
   ``re.match(r".*?\\.[^.]*\\.(\\d+)\\.", key)``, or with ``layers_pattern`` (str or list, tried in
   order) by ``re.match(rf"(?:^|.*?\\.){pattern}\\.(\\d+)\\.", key)``. No index: no match.

``"all-linear"`` (case-insensitive) is replaced by the set of linear module paths, matched by
exact name (so the layer filter never applies). ``rank_pattern`` / ``alpha_pattern``: the first
key in dict order with ``re.match(rf"(.*\\.)?({k})$", key)`` wins. ``modules_to_save`` copies and
IA3 ``feedforward_modules`` use a plain suffix test, ``key.endswith(name)`` with no dot boundary
(a str is a regex full match).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax

from peftjax._tree import keypath_to_names, module_path
from peftjax.errors import ConfigError, TargetError

__all__ = [
    "ALL_LINEAR",
    "OUTPUT_HEAD_NAMES",
    "SEQ_CLS_HEAD_NAMES",
    "check_pattern_keys",
    "exact_regex",
    "find_pattern_key",
    "get_pattern_value",
    "is_all_linear",
    "is_excluded",
    "is_in_modules_to_save",
    "keypath_to_names",
    "layer_index",
    "leaf_name",
    "matches_target",
    "module_leaf_items",
    "module_path",
    "select_all_linear",
    "select_modules",
    "select_modules_to_save",
    "suffix_match",
    "validate_layer_options",
]

V = TypeVar("V")
Targets = str | Collection[str] | None
LayerIndices = int | Sequence[int] | None
LayersPattern = str | Sequence[str] | None

ALL_LINEAR = "all-linear"
#: Last path segments treated as the output head that ``"all-linear"`` leaves out.
OUTPUT_HEAD_NAMES: tuple[str, ...] = ("lm_head",)
#: Classifier heads PEFT leaves out of ``"all-linear"`` for ``task_type="SEQ_CLS"``.
SEQ_CLS_HEAD_NAMES: tuple[str, ...] = ("score", "classifier")
_MAX_EXAMPLES = 5


# --------------------------------------------------------------------------- module paths


def module_leaf_items(tree: Any) -> list[tuple[str, str, int]]:
    """Lists ``(module_path, leaf_name, ndim)`` for every array leaf of a params tree.

    Works for linen variable dicts, plain nested dicts/lists and nnx ``State`` (whose
    ``Variable`` leaves flatten to their value).

    Args:
        tree: A pytree of arrays (or ``jax.ShapeDtypeStruct``).

    Returns:
        One triple per leaf, in flattening order.
    """
    items = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = keypath_to_names(keypath)
        ndim = len(getattr(leaf, "shape", ()))
        items.append((module_path(names, ndim), leaf_name(names), ndim))
    return items


def leaf_name(names: Sequence[str]) -> str:
    """Returns the last segment of a leaf path (e.g. ``"kernel"``), ``""`` for an empty path."""
    return names[-1] if names else ""


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"`{field}` entry {pattern!r} is not a valid regex: {err}") from err


def _str_collection(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"`{field}` must be a str or a list of str, got {value!r}")
    items = tuple(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"`{field}` must contain only str, got {bad[0]!r} in {value!r}")
    return items


def _fmt(value: Any) -> str:
    if isinstance(value, set | frozenset):
        return repr(sorted(value))
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _examples(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_EXAMPLES])
    return shown + (", ..." if len(keys) > _MAX_EXAMPLES else "")


def _uses_layer_filter(layers_to_transform: LayerIndices) -> bool:
    if layers_to_transform is None:
        return False
    return isinstance(layers_to_transform, int) or len(layers_to_transform) != 0


# --------------------------------------------------------------------------- single-key rules


def is_excluded(key: str, exclude_modules: Targets) -> bool:
    """PEFT's ``exclude_modules`` rule: str → regex full match; collection → name or ``.``-suffix.

    Args:
        key: A module path.
        exclude_modules: ``None``, a regex, or a collection of names / dotted suffixes.

    Returns:
        Whether the module is excluded.
    """
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return _compile(exclude_modules, "exclude_modules").fullmatch(key) is not None
    names = _str_collection(exclude_modules, "exclude_modules")
    return key in names or any(key.endswith("." + e) for e in names)


def is_in_modules_to_save(key: str, modules_to_save: Collection[str] | None) -> bool:
    """PEFT's rule keeping adapters off ``modules_to_save`` (whole segments of ``key``).

    Matches ``re.match(rf"(^|.*\\.){m}($|\\..*)", key)`` (``m`` is used as a regex), so
    ``"lm_head"`` covers ``lm_head`` and ``lm_head.x`` but ``"head"`` does not cover ``lm_head``
    (although ``"head"`` does select ``lm_head`` for copying, see :func:`suffix_match`).

    Args:
        key: A module path.
        modules_to_save: ``None`` or module names.

    Returns:
        Whether the module is off limits to adapters.
    """
    if not modules_to_save:
        return False
    names = _str_collection(modules_to_save, "modules_to_save")
    return any(
        _compile(rf"(^|.*\.){m}($|\..*)", "modules_to_save").match(key) is not None for m in names
    )


def suffix_match(key: str, names: Targets, field: str = "modules_to_save") -> bool:
    """Suffix test of ``modules_to_save`` copies and IA3 ``feedforward_modules``.

    Args:
        key: A module path.
        names: A regex (``re.fullmatch``) or names tested with ``key.endswith(name)`` (no dot
            boundary: ``"head"`` matches ``lm_head``).
        field: Config field name used in error messages.

    Returns:
        Whether ``key`` matches.
    """
    if not names:
        return False
    if isinstance(names, str):
        return _compile(names, field).fullmatch(key) is not None
    return any(key.endswith(n) for n in _str_collection(names, field))


def exact_regex(paths: Iterable[str]) -> str:
    """A regex that full-matches exactly ``paths`` (longest first, so alternation is exact)."""
    return "|".join(re.escape(p) for p in sorted(paths, key=lambda p: (-len(p), p)))


def layer_index(key: str, layers_pattern: LayersPattern = None) -> int | None:
    """Returns the layer index PEFT reads from a module path for ``layers_to_transform``.

    Without ``layers_pattern`` (``None``, ``""`` or ``[]``): ``re.match(r".*?\\.[^.]*\\.(\\d+)\\.",
    key)``, which needs a segment before the list name and a segment after the index. With
    ``layers_pattern``: each pattern in turn with
    ``re.match(rf"(?:^|.*?\\.){p}\\.(\\d+)\\.", key)``.
    The lazy prefix takes the *first* index (``layers.1`` in ``model.layers.1.experts.0.w``).

    Args:
        key: A module path.
        layers_pattern: ``None``, a name (regex) of the layer list, or several.

    Returns:
        The index, or ``None`` when the path has none.
    """
    if not layers_pattern:
        m = _compile(r".*?\.[^.]*\.(\d+)\.", "layers_pattern").match(key)
        return int(m.group(1)) if m else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in _str_collection(patterns, "layers_pattern"):
        m = _compile(rf"(?:^|.*?\.){pattern}\.(\d+)\.", "layers_pattern").match(key)
        if m:
            return int(m.group(1))
    return None


def is_all_linear(target_modules: Targets) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand (a str, any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def matches_target(
    key: str,
    target_modules: Targets,
    *,
    layers_to_transform: LayerIndices = None,
    layers_pattern: LayersPattern = None,
) -> bool:
    """PEFT's ``target_modules`` + ``layers_to_transform`` rule for one module path.

    Exclusions are not applied here (see :func:`select_modules`).

    Args:
        key: A module path.
        target_modules: A regex (full match) or a collection of names / dotted suffixes.
            ``"all-linear"`` must be expanded first (:func:`select_all_linear`).
        layers_to_transform: Layer indices kept among suffix matches (int or list).
        layers_pattern: Name(s) of the layer list used to find the index.

    Returns:
        Whether the module is targeted.

    Raises:
        ConfigError: ``target_modules`` is ``"all-linear"`` or malformed.
    """
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if is_all_linear(target_modules):
            raise ConfigError(
                "`target_modules='all-linear'` must be expanded to module paths first "
                "(peftjax.paths.select_all_linear)"
            )
        return _compile(target_modules, "target_modules").fullmatch(key) is not None
    targets = _str_collection(target_modules, "target_modules")
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    if not _uses_layer_filter(layers_to_transform):
        return True
    index = layer_index(key, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform  # type: ignore[operator]


# --------------------------------------------------------------------------- rank/alpha patterns


def find_pattern_key(
    key: str, pattern_keys: Iterable[str], field: str = "rank_pattern"
) -> str | None:
    """Returns the first pattern key with ``re.match(rf"(.*\\.)?({k})$", key)``, else ``None``."""
    for k in pattern_keys:
        if _compile(rf"(.*\.)?({k})$", field).match(key):
            return k
    return None


def get_pattern_value(
    key: str, pattern: Mapping[str, V], default: V, field: str = "rank_pattern"
) -> V:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup.

    The first key in dict order whose regex matches the end of ``key`` at a segment boundary
    (``re.match(rf"(.*\\.)?({k})$", key)``) wins: ``"q_proj"`` matches every ``...q_proj`` and
    ``"layers.0.self_attn.q_proj"`` only that one, whichever comes first in the dict. Note that
    PEFT writes ``adapter_config.json`` with sorted keys, so a reloaded dict is alphabetical.

    Args:
        key: A module path.
        pattern: Pattern key → value.
        default: Value when no key matches (the config's ``r`` or alpha).
        field: Config field name used in error messages.

    Returns:
        The value for ``key``.
    """
    k = find_pattern_key(key, pattern, field)
    if k is not None:
        return pattern[k]
    return pattern.get(key, default)


def check_pattern_keys(keys: Sequence[str], pattern: Mapping[str, Any], field_name: str) -> None:
    """Raises when a ``rank_pattern`` / ``alpha_pattern`` key matches none of ``keys``.

    PEFT applies such a key silently (it only warns in recent versions); peftjax refuses it.

    Args:
        keys: The targeted module paths.
        pattern: The pattern dict.
        field_name: ``"rank_pattern"`` or ``"alpha_pattern"``, for the message.

    Raises:
        TargetError: A key matches no module path.
        ConfigError: A key is not a valid regex.
    """
    for k in pattern:
        if not isinstance(k, str):
            raise ConfigError(f"`{field_name}` keys must be str, got {k!r}")
        regex = _compile(rf"(.*\.)?({k})$", field_name)
        if not any(regex.match(key) for key in keys):
            raise TargetError(
                f"`{field_name}` key {k!r} matches none of the targeted modules "
                f"(a key matches a module path ending in it at a `.` boundary); targeted module "
                f"paths look like: {_examples(list(keys))}"
            )


# --------------------------------------------------------------------------- selections


def select_all_linear(
    items: Iterable[tuple[str, str, int]],
    *,
    output_heads: Collection[str] = OUTPUT_HEAD_NAMES,
    task_type: str | None = None,
) -> list[str]:
    """Expands ``"all-linear"`` for a Flax tree.

    Flax rule (PEFT checks module classes and ``model.get_output_embeddings()``, which a
    params tree lacks): a module is linear when it holds a 2-D leaf named ``kernel`` (``Dense``
    / ``nnx.Linear``; conv kernels have more dims, embeddings are named ``embedding``). The
    output head, any module whose last segment is in ``output_heads`` (``lm_head``), is left
    out. When no output head exists and ``task_type == "SEQ_CLS"``, a top-level ``score`` or
    ``classifier`` module is left out instead, as PEFT does.

    Args:
        items: ``(module_path, leaf_name, ndim)`` triples (see :func:`module_leaf_items`).
        output_heads: Last-segment names of output heads.
        task_type: The config's task type.

    Returns:
        Linear module paths, in input order, without duplicates.
    """
    linear = [path for path, name, ndim in items if name == "kernel" and ndim == 2 and path]
    linear = list(dict.fromkeys(linear))
    heads = {p for p in linear if p.rsplit(".", 1)[-1] in output_heads}
    if not heads and task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            if name in linear:
                heads = {name}
                break
    return [p for p in linear if p not in heads]


def select_modules_to_save(
    keys: Sequence[str], modules_to_save: Collection[str] | None
) -> list[str]:
    """Module paths copied by ``modules_to_save`` (PEFT's ``key.endswith(name)`` test).

    Every ancestor path of ``keys`` is a candidate (a head module may only hold sub-modules);
    a match nested inside an earlier match is dropped, since the outer copy contains it.

    Args:
        keys: Weight-holding module paths.
        modules_to_save: Names tested with ``endswith`` (no dot boundary).

    Returns:
        Matching paths, outermost first, in tree order.

    Raises:
        TargetError: ``modules_to_save`` is given but matches nothing.
    """
    if not modules_to_save:
        return []
    names = _str_collection(modules_to_save, "modules_to_save")
    candidates: dict[str, None] = {}
    for key in keys:
        parts = key.split(".") if key else []
        for i in range(1, len(parts) + 1):
            candidates[".".join(parts[:i])] = None
    chosen: list[str] = []
    for path in candidates:
        if any(path.endswith(n) for n in names) and not any(
            path.startswith(c + ".") for c in chosen
        ):
            chosen.append(path)
    if not chosen:
        raise TargetError(
            f"`modules_to_save={_fmt(modules_to_save)}` matched no module; module paths look "
            f"like: {_examples(list(keys))}"
        )
    return chosen


def validate_layer_options(
    target_modules: Targets,
    layers_to_transform: LayerIndices,
    layers_pattern: LayersPattern,
    *,
    forbid_with_str_target: bool = True,
) -> None:
    """PEFT's config-time checks of ``layers_to_transform`` / ``layers_pattern``.

    LoRA forbids both with a str ``target_modules`` (``forbid_with_str_target=True``); LoHa and
    LoKr only require ``layers_to_transform`` when ``layers_pattern`` is set.

    Raises:
        ConfigError: Naming the offending fields.
    """
    if layers_to_transform is not None:
        ok = isinstance(layers_to_transform, int) and not isinstance(layers_to_transform, bool)
        if not ok:
            ok = isinstance(layers_to_transform, Sequence) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers_to_transform
            )
        if not ok:
            raise ConfigError(
                "`layers_to_transform` must be an int or a list of int, "
                f"got {layers_to_transform!r}"
            )
    if layers_pattern is not None and not isinstance(layers_pattern, str):
        _str_collection(layers_pattern, "layers_pattern")
    if forbid_with_str_target and isinstance(target_modules, str):
        if layers_to_transform is not None:
            raise ConfigError(
                f"`layers_to_transform` cannot be used when `target_modules` is a str "
                f"(`target_modules={target_modules!r}`)"
            )
        if layers_pattern is not None:
            raise ConfigError(
                f"`layers_pattern` cannot be used when `target_modules` is a str "
                f"(`target_modules={target_modules!r}`)"
            )
    if layers_pattern and layers_to_transform is None:
        raise ConfigError(
            f"`layers_pattern={_fmt(layers_pattern)}` requires `layers_to_transform` to be set"
        )


def select_modules(
    keys: Sequence[str],
    *,
    target_modules: Targets,
    exclude_modules: Targets = None,
    layers_to_transform: LayerIndices = None,
    layers_pattern: LayersPattern = None,
    modules_to_save: Collection[str] | None = None,
    linear_modules: Collection[str] | None = None,
    forbid_with_str_target: bool = True,
) -> list[str]:
    """Selects the module paths an adapter goes on, with PEFT's rules in PEFT's order.

    Args:
        keys: Candidate module paths (PEFT's ``named_modules`` keys).
        target_modules: A regex, a collection of names / dotted suffixes, or ``"all-linear"``.
        exclude_modules: A regex or a collection of names / dotted suffixes.
        layers_to_transform: Layer indices (int or list) kept among suffix matches.
        layers_pattern: Name(s) of the layer list used to find the index.
        modules_to_save: Modules that are copied whole and so never get an adapter.
        linear_modules: The expansion of ``"all-linear"`` (:func:`select_all_linear`); needed
            only when ``target_modules`` is ``"all-linear"``.
        forbid_with_str_target: Apply LoRA's rule rejecting layer options with a str target.

    Returns:
        The selected paths in the order of ``keys``, without duplicates.

    Raises:
        ConfigError: Invalid or conflicting field values.
        TargetError: Nothing is selected; the message names the field(s) responsible. A
            ``UserWarning`` is issued, as in PEFT, when ``exclude_modules`` excludes nothing.
    """
    validate_layer_options(
        target_modules,
        layers_to_transform,
        layers_pattern,
        forbid_with_str_target=forbid_with_str_target,
    )
    keys = list(dict.fromkeys(keys))
    shown = f"`target_modules={_fmt(target_modules)}`"
    if target_modules is None or (not isinstance(target_modules, str) and not target_modules):
        raise TargetError(f"{shown} targets nothing; name the modules to adapt")
    if not keys:
        raise TargetError(f"{shown}: the params tree has no module to match")
    targets: Targets = target_modules
    if is_all_linear(target_modules):
        if linear_modules is None:
            raise ConfigError(
                "`target_modules='all-linear'` needs `linear_modules` "
                "(peftjax.paths.select_all_linear)"
            )
        targets = set(linear_modules)

    def hit(key: str) -> bool:
        return matches_target(
            key, targets, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
        )

    selected: list[str] = []
    by_exclude: list[str] = []
    by_save: list[str] = []
    for key in keys:
        if is_excluded(key, exclude_modules):
            by_exclude.append(key)
        elif is_in_modules_to_save(key, modules_to_save):
            by_save.append(key)
        elif hit(key):
            selected.append(key)

    if selected:
        if exclude_modules and not by_exclude:
            warnings.warn(
                f"`exclude_modules={_fmt(exclude_modules)}` excluded no module; module paths look "
                f"like: {_examples(keys)}",
                UserWarning,
                stacklevel=2,
            )
        return selected

    excluded_hits = [k for k in by_exclude if hit(k)]
    saved_hits = [k for k in by_save if hit(k)]
    if excluded_hits or saved_hits:
        causes = []
        if excluded_hits:
            causes.append(f"`exclude_modules={_fmt(exclude_modules)}`")
        if saved_hits:
            causes.append(f"`modules_to_save={_fmt(modules_to_save)}`")
        raise TargetError(
            f"every module matched by {shown} is excluded by {' and '.join(causes)}; "
            f"matched: {_examples(excluded_hits + saved_hits)}"
        )
    if is_all_linear(target_modules):
        raise TargetError(
            f"{shown} found no linear module (a 2-D `kernel` other than the output head); "
            f"module paths look like: {_examples(keys)}"
        )
    msg = f"{shown} matched no module"
    if _uses_layer_filter(layers_to_transform):
        unfiltered = [k for k in keys if matches_target(k, targets)]
        msg += f" with `layers_to_transform={layers_to_transform!r}`"
        if layers_pattern:
            msg += f" and `layers_pattern={_fmt(layers_pattern)}`"
        if unfiltered:
            found = sorted(
                {i for k in unfiltered if (i := layer_index(k, layers_pattern)) is not None}
            )
            msg += f" ({len(unfiltered)} match without it; layer indices found: {found})"
    raise TargetError(f"{msg}; module paths look like: {_examples(keys)}")
