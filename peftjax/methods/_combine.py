"""What `pj.add_weighted_adapter` shares between methods: PEFT's merge rules
(``peft/utils/merge_utils.py``: task arithmetic, TIES, DARE, magnitude pruning), the layer
bookkeeping of stacked adapters, and the call a method's combiner receives.

A method that can be combined names its combiner in its registry row (`Method.combine`): a
function of a `CombineCall` that returns ``{leaf index: (new spec, new arrays)}`` for the weight
leaves (`Site`) carrying the adapters. LoRA's is `peftjax.methods.lora.combine_lora`, IA3's
`peftjax.methods.ia3.combine_ia3`; `peftjax.arithmetic` checks the arguments, finds the sites
and puts the results in the tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
#: the types that combine LoRA's factors themselves (the adapters need one rank)
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: the types that need ``density``
DENSITY_TYPES = frozenset(COMBINATION_TYPES) - {"svd", "linear", "cat"}
#: the rule each type reduces to when ``density >= 1`` (PEFT's ``prune`` then does nothing)
UNPRUNED = {
    "dare_linear": "linear",
    "magnitude_prune": "linear",
    "dare_ties": "ties",
    "dare_linear_svd": "svd",
    "magnitude_prune_svd": "svd",
    "dare_ties_svd": "ties_svd",
}


def rule_of(combination_type: str) -> str:
    """The merge rule of a combination type (``svd`` is task arithmetic, ``linear``)."""
    if combination_type == "svd":
        return "linear"
    return (
        combination_type[: -len("_svd")] if combination_type.endswith("_svd") else combination_type
    )


def magnitude_prune(t, density: float):
    """PEFT's ``magnitude_based_pruning``: keep the ``int(density * t.size)`` largest |values|."""
    k = int(density * t.size)
    flat = t.reshape(-1)
    if k == 0:
        return jnp.zeros_like(t)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, t.dtype).at[idx].set(1)
    return (flat * mask).reshape(t.shape)


def random_prune(t, density: float, key):
    """PEFT's ``random_pruning`` with rescaling: keep each value with probability ``density``
    and divide the kept ones by it."""
    keep = jax.random.bernoulli(key, density, t.shape)
    return jnp.where(keep, t, jnp.zeros_like(t)) / jnp.asarray(density, t.dtype)


def merge_tensors(rule: str, tensors, weights, density, sign_method: str, keys):
    """PEFT's ``task_arithmetic`` / ``ties`` / ``dare_linear`` / ``dare_ties`` /
    ``magnitude_prune`` of same-shape ``tensors`` with ``weights`` (one per tensor)."""
    if rule in ("ties", "magnitude_prune") and density < 1:
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties") and density < 1:
        tensors = [random_prune(t, density, k) for t, k in zip(tensors, keys)]
    t = jnp.stack(tensors)
    w = jnp.asarray(weights, t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))
    if rule in ("ties", "dare_ties"):
        sign = jnp.sign(t)
        votes = t.sum(0) if sign_method == "total" else sign.sum(0)
        majority = jnp.where(votes >= 0, 1.0, -1.0).astype(t.dtype)
        mask = (sign == majority).astype(t.dtype)
        return (t * w * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)
    return (t * w).sum(0)


@dataclasses.dataclass
class Site:
    """One weight leaf carrying some of the combined adapters."""

    leaf: Any  # a `peftjax._tree.Leaf`
    present: list[tuple[int, str]]  # (position in `adapters`, name), in `adapters` order


@dataclasses.dataclass(frozen=True)
class CombineCall:
    """One `pj.add_weighted_adapter` call, its arguments checked, as a method's combiner gets
    it. ``weights``: one per adapter, Python floats when ``concrete`` (else traced scalars);
    ``check_density(combination_type)``: ``(density, key)`` checked for the type a LoRA-style
    combiner settles on (it raises `ConfigError` / `ArgumentTypeError` naming the argument)."""

    sites: list[Site]
    adapters: tuple[str, ...]
    weights: Sequence[Any]
    concrete: bool
    combination_type: str
    svd_rank: int | None
    svd_clamp: float | None
    svd_full_matrices: bool
    majority_sign_method: str
    check_density: Callable[[str], tuple[Any, Any]]


def flat_layers(spec, arrays, n: int):
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


def store(spec, flat: dict, layers):
    """Full-stack ``(n, ...)`` arrays as the new adapter stores them: only ``layers``
    (compact) or with the stack axes leading; unstacked: the one layer."""
    if not spec.layout.stack:
        return {k: v[0] for k, v in flat.items()}
    if layers is not None:
        idx = np.asarray(layers)
        return {k: v[idx] for k, v in flat.items()}
    stack = spec.layout.stack_shape(spec.shape)
    return {k: v.reshape(stack + v.shape[1:]) for k, v in flat.items()}


def weight_table(weights, concrete: bool, scales: np.ndarray):
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


def first_spec(adapters, node, specs):
    """The spec whose settings (dropout, init) the new adapter takes: the first adapter's."""
    return node.spec(adapters[0]) if adapters[0] in node.names else specs[0]
