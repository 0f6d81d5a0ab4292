"""Splitting adapter-carrying params for ``jax.grad`` and optax, and counting parameters.

`partition` returns ``(trainable, frozen)``: ``trainable`` has the tree's structure with only
the active, unmerged adapters' arrays as leaves (every other leaf is ``None``, an empty
pytree), so ``jax.grad`` and ``optimizer.init`` see adapter-sized trees and never build a
gradient or optimizer state for a frozen weight. `combine` is its exact inverse.
"""

from __future__ import annotations

import jax
import numpy as np

from .node import Adapted, is_adapted


def _split_node(node: Adapted):
    live = {n for n, _, _ in node.pending()}
    train = {n: (a if n in live and a else None) for n, a in node.arrays.items()}
    frozen = {n: (None if n in live and a else a) for n, a in node.arrays.items()}
    return node.replace(base=None, arrays=train), node.replace(arrays=frozen)


def partition(params):
    """Split into ``(trainable, frozen)``; see the module docstring."""
    t = jax.tree_util.tree_map(
        lambda x: _split_node(x)[0] if is_adapted(x) else None, params, is_leaf=is_adapted
    )
    f = jax.tree_util.tree_map(
        lambda x: _split_node(x)[1] if is_adapted(x) else x, params, is_leaf=is_adapted
    )
    return t, f


def combine(trainable, frozen):
    """Inverse of `partition`: ``combine(*partition(p))`` is ``p``."""

    def join(f, t):
        if not is_adapted(f):
            return f
        arrays = {
            n: (t.arrays.get(n) if t is not None and t.arrays.get(n) is not None else a)
            for n, a in f.arrays.items()
        }
        return f.replace(arrays=arrays)

    return jax.tree_util.tree_map(join, frozen, trainable, is_leaf=is_adapted)


def trainable_mask(params):
    """A tree of bools with ``params``' structure, True on the trainable adapter arrays.

    Note: ``optax.masked(tx, mask)`` alone passes the *raw gradients* of masked-out leaves
    through as updates, which would change frozen weights; use `adapter_optimizer` (or chain a
    masked ``optax.set_to_zero()`` for the complement) when training a single full tree.
    """
    t, _ = partition(params)
    full = jax.tree_util.tree_map(lambda x: x, params, is_leaf=is_adapted)

    def mark(node, tn):
        if not is_adapted(node):
            return False
        arrays = {
            n: jax.tree_util.tree_map(lambda _, n=n: tn.arrays[n] is not None, a)
            for n, a in node.arrays.items()
        }
        return node.replace(base=False, arrays=arrays)

    return jax.tree_util.tree_map(mark, full, t, is_leaf=is_adapted)


def _size(x) -> int:
    return int(np.prod(getattr(x, "shape", ()))) if x is not None else 0


def _adapter_size(arrays) -> int:
    """Parameters of one adapter's arrays (DoRA's cached ``weight_norm`` is not a parameter)."""
    return sum(_size(v) for k, v in arrays.items() if k != "weight_norm")


def count_parameters(params) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts, as HF PEFT's ``get_nb_trainable_parameters``:
    all = base weights plus every adapter's arrays; trainable = active unmerged adapters."""
    t, _ = partition(params)
    trainable = sum(_size(x) for x in jax.tree_util.tree_leaves(t))
    total = 0
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_adapted):
        if is_adapted(x):
            total += _size(x.base)
            total += sum(_adapter_size(a) for a in x.arrays.values())
        else:
            total += _size(x)
    return trainable, total


def _peft_line(params) -> str:
    trainable, total = count_parameters(params)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(params, print_fn=print) -> str:
    """Print HF PEFT's line: ``trainable params: T || all params: A || trainable%: P``."""
    line = _peft_line(params)
    print_fn(line)
    return line


def summary(params, print_fn=print) -> str:
    """Print PEFT's trainable-parameter line and a per-module table of adapters.

    Columns: module path, leaf, base shape and dtype, adapter (method and rank), its
    parameter count, and its state (active / merged / off).
    """
    from .transforms import _walk

    rows = [("module", "leaf", "base", "adapter", "params", "state")]
    for l in _walk(params)[0]:
        node = l.value
        if not is_adapted(node):
            continue
        base = f"{node.base.dtype}{list(node.base.shape)}"
        for n, spec in node.specs:
            count = _adapter_size(node.arrays[n])
            state = "merged" if n in node.merged else ("active" if n in node.active else "off")
            rows.append((l.module, l.name, base, f"{n}: {spec.describe()}", f"{count:,d}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join([_peft_line(params), *lines])
    print_fn(text)
    return text


def adapter_optimizer(tx, params):
    """Wrap optax transformation ``tx`` for training a single full tree of ``params``.

    The trainable adapter arrays get ``tx``; every other leaf (base weights, inactive or
    merged adapters) gets a zero update and no optimizer state (``optax.set_to_zero``). For
    the leanest training, prefer `partition` / `combine`: gradients are then never computed
    for frozen weights at all.

    >>> import jax, jax.numpy as jnp, optax, peftjax as pj
    >>> p = pj.inject({"q": {"kernel": jnp.ones((4, 4))}}, pj.LoraConfig(r=2, target_modules=["q"]),
    ...               key=jax.random.key(0))
    >>> opt = pj.adapter_optimizer(optax.adam(1e-2), p)
    >>> state = opt.init(p)
    """
    import optax

    labels = jax.tree_util.tree_map(
        lambda m: "adapter" if m else "frozen",
        trainable_mask(params),
        is_leaf=lambda x: isinstance(x, bool),
    )
    return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)
