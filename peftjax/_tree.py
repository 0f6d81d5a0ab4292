"""The one definition of a *module path* and the one walk over a params tree.

Every part of peftjax that needs to know which module a leaf belongs to (inject, merge, the
forward, the files, checkpoints, counting) asks this module.

Module paths: a leaf named ``kernel``, ``embedding``, ``weight``, ``w``, ``bias``, ``b`` or
``scale`` (or any leaf with fewer than 2 dims) belongs to the module of its parent dict, whose
dotted path (leading linen ``params`` collection dropped) is the module path. Any other array leaf
with 2 or more dims is a module of its own, named by its full path (plain trees like
``{"q": W_q, "k": W_k}``). A leaf at the root is a module of its own.

Key paths become names as `keypath_to_names` says: ``DictKey`` gives ``str(key)``,
``GetAttrKey`` its name, ``SequenceKey`` its index, ``FlattenedIndexKey`` its key; a trailing
``value`` / ``raw_value`` attribute (an nnx ``Variable`` flattened to its array) is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax

from .node import is_adapted, leaves_with_paths

__all__ = [
    "BIAS_NAMES",
    "MEMBER_NAMES",
    "WEIGHT_NAMES",
    "Leaf",
    "adapted_nodes",
    "bias_leaf",
    "dotted",
    "global_active",
    "group_modules",
    "keypath_to_names",
    "module_path",
    "rebuild",
    "subtree_leaves",
    "walk",
    "weight_leaf",
]

WEIGHT_NAMES = ("kernel", "weight", "embedding", "w")
BIAS_NAMES = ("bias", "b")
# Leaves that belong to their parent dict's module whatever their rank: a DenseGeneral bias
# (heads, head_dim) or a scanned layer's bias / norm scale (L, features) is not a module.
MEMBER_NAMES = WEIGHT_NAMES + BIAS_NAMES + ("scale",)
_VARIABLE_VALUE_ATTRS = ("value", "raw_value")
_COLLECTION = "params"


def keypath_to_names(keypath: Iterable[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as string segments (see the module docstring)."""
    entries = list(keypath)
    if (
        entries
        and isinstance(entries[-1], jax.tree_util.GetAttrKey)
        and entries[-1].name in _VARIABLE_VALUE_ATTRS
    ):
        entries.pop()
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            names.append(str(entry.key))
        else:
            names.append(str(entry))
    return tuple(names)


def dotted(names: Sequence[str]) -> str:
    """Segments as a dotted path, a leading linen ``params`` collection dropped."""
    names = list(names)
    if names and names[0] == _COLLECTION:
        names = names[1:]
    return ".".join(names)


def module_path(names: Sequence[str], ndim: int = 0) -> str:
    """The module path of the leaf at ``names`` (its segments) with ``ndim`` dims."""
    name = names[-1] if names else ""
    own = name not in MEMBER_NAMES and ndim >= 2
    module = dotted(names[:-1])
    if own or not module:  # a weight at the root is a module of its own
        module = dotted(names)
    return module


@dataclasses.dataclass
class Leaf:
    """One leaf of a walked tree: its flat index, path segments, leaf name, module and value."""

    index: int
    names: tuple[str, ...]
    name: str  # leaf name
    module: str  # module path
    value: Any  # array or Adapted

    @property
    def base(self):
        return self.value.base if is_adapted(self.value) else self.value


def walk(params) -> tuple[list[Leaf], Any]:
    """Every leaf of ``params`` (`Adapted` nodes are leaves) with its module, and the treedef."""
    flat, treedef = leaves_with_paths(params)
    leaves = []
    for i, (kp, leaf) in enumerate(flat):
        names = keypath_to_names(kp)
        base = leaf.base if is_adapted(leaf) else leaf
        ndim = len(getattr(base, "shape", ()))
        leaves.append(Leaf(i, names, names[-1] if names else "", module_path(names, ndim), leaf))
    return leaves, treedef


def rebuild(treedef, leaves: list[Leaf]):
    """The tree of ``leaves``' values. Every node of the result is a new object with its own
    ``arrays`` dicts (`Adapted` copies them), even where a transform left it as it was: no tree
    shares a container with another."""
    vals = [l.value.replace() if is_adapted(l.value) else l.value for l in leaves]
    return jax.tree_util.tree_unflatten(treedef, vals)


def group_modules(leaves: list[Leaf]) -> dict[str, list[Leaf]]:
    """``{module path: its leaves}``, in tree order."""
    out: dict[str, list[Leaf]] = {}
    for l in leaves:
        out.setdefault(l.module, []).append(l)
    return out


def weight_leaf(group: list[Leaf]) -> Leaf | None:
    """The weight of a module: its ``kernel`` / ``weight`` / ``embedding`` / ``w`` leaf, or its
    one own array of 2 or more dims; ``None`` for a module without one (a norm, a bias)."""
    arrays = [l for l in group if len(getattr(l.base, "shape", ())) >= 2]
    for wname in WEIGHT_NAMES:
        for l in arrays:
            if l.name == wname:
                return l
    own = [l for l in arrays if l.name not in MEMBER_NAMES]
    return own[0] if len(own) == 1 else None


def bias_leaf(group: list[Leaf], weight: Leaf) -> Leaf | None:
    for l in group:
        if l is not weight and l.name in BIAS_NAMES:
            return l
    return None


def adapted_nodes(leaves) -> list:
    return [l.value for l in leaves if is_adapted(l.value)]


def global_active(leaves) -> tuple[str, ...]:
    nodes = adapted_nodes(leaves)
    return nodes[0].active if nodes else ()


def subtree_leaves(groups: dict[str, list[Leaf]], mod: str) -> list[Leaf]:
    """The leaves of module ``mod`` and of every module below it."""
    out = []
    for m, g in groups.items():
        if m == mod or m.startswith(mod + "."):
            out.extend(g)
    return out
