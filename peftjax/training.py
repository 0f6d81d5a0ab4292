"""Splitting adapter-carrying params for ``jax.grad`` and optax, and counting parameters.

`partition` returns ``(trainable, frozen)``: ``trainable`` has the tree's structure with only
the active, unmerged adapters' arrays as leaves (every other leaf is ``None``, an empty
pytree), so ``jax.grad`` and ``optimizer.init`` see adapter-sized trees and never build a
gradient or optimizer state for a frozen weight. `combine` is its exact inverse.

Adapters marked frozen (``inference_mode=True``, `pj.set_trainable`) are never trainable.
Parameter counts follow HF PEFT's, and are the sizes of the stored arrays: a stacked (scanned)
weight's layer slices that ``layers_to_transform`` excluded have no arrays (compact storage,
`peftjax.methods.base`), as PEFT has no adapter there; their gradients and optimizer state
(from ``partition(params)[0]``) do not exist either.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from .errors import ArgumentTypeError, PartitionError, PeftJaxError, ShapeError
from .node import Adapted, is_adapted, is_weight_node


def _live(node: Adapted) -> set[str]:
    """The adapters of ``node`` that train: active, unmerged and not frozen."""
    return {n for n, _, _ in node.pending() if n not in node.frozen}


def _split_node(node: Adapted):
    """``(trainable, frozen)`` halves of one node: a live adapter's arrays go to the trainable
    half except its spec's `frozen_arrays` (e.g. shared random projections), which stay frozen;
    a half with no arrays of an adapter holds ``None`` for it."""
    live = _live(node)
    train, frozen = {}, {}
    for n, a in node.arrays.items():
        fixed = node.spec(n).frozen_arrays
        t = {k: v for k, v in a.items() if k not in fixed} if n in live and a else {}
        f = {k: v for k, v in a.items() if k not in t} if a else a
        train[n], frozen[n] = t or None, (f if f or not t else None)
    return node.replace(base=None, arrays=train), node.replace(arrays=frozen)


def partition(params):
    """Split into ``(trainable, frozen)``; see the module docstring.

    Args:
      params: the adapter-carrying tree (any pytree: one without adapters has nothing
        trainable).

    Returns:
      ``(trainable, frozen)``, two trees with the structure of ``params``. ``trainable`` holds
      only the arrays of the active, unmerged, not frozen adapters (every other leaf ``None``);
      ``frozen`` holds everything else. `combine` joins them back.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> trainable, frozen = pj.partition(p)
      >>> [x.shape for x in jax.tree_util.tree_leaves(trainable)]  # lora_A, lora_B
      [(4, 2), (2, 3)]
      >>> [x.shape for x in jax.tree_util.tree_leaves(frozen)]  # the base weight
      [(4, 3)]
    """
    # a quantized weight (`pj.quantize`) is one frozen leaf: never in the trainable half
    t = jax.tree_util.tree_map(
        lambda x: _split_node(x)[0] if is_adapted(x) else None, params, is_leaf=is_weight_node
    )
    f = jax.tree_util.tree_map(
        lambda x: _split_node(x)[1] if is_adapted(x) else x, params, is_leaf=is_weight_node
    )
    return t, f


def _lacks_trainable(f: Adapted, n: str, a) -> bool:
    """Whether the trainable half must bring arrays of adapter ``n`` whose frozen half is
    ``a``: all of them (``None``), or those beside the `frozen_arrays` of a live adapter."""
    if a is None:
        return True
    spec = f.spec(n)
    if n not in _live(f) or not set(a) <= spec.frozen_arrays:
        return False
    want = _expected_shapes(spec)
    return want is not None and bool(set(want) - set(a))


@functools.lru_cache(maxsize=4096)
def _expected_shapes(spec) -> dict[str, tuple[int, ...]] | None:
    """The array shapes `inject` gives an adapter with ``spec`` (static, cached per spec)."""
    import jax.numpy as jnp

    try:
        base = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
        out = jax.eval_shape(lambda b: spec.init(jax.random.key(0), b), base)
        return {k: tuple(v.shape) for k, v in out.items()}
    except Exception:  # a spec whose init cannot run abstractly: no shape check
        return None


def _keystr(kp) -> str:
    from ._tree import keypath_to_names

    return ".".join(keypath_to_names(kp)) or "<root>"


def combine(trainable, frozen):
    """Inverse of `partition`: ``combine(*partition(p))`` is ``p``.

    Raises `PartitionError` when ``frozen`` is not the second half of a `partition` (for example
    the original params, which would silently drop the adapters) and `ShapeError` when an array
    of ``trainable`` does not have the shape the adapter in ``frozen`` expects (trees from
    injections with different ranks). The checks use static shapes only (they work under
    ``jit``).

    Args:
      trainable: the first tree of ``pj.partition(params)`` (or an update of it: new arrays
        of the same shapes, e.g. after an optimizer step).
      frozen: the second tree of the same `partition` call.

    Returns:
      The full adapter-carrying tree, ``params``' structure, the arrays of ``trainable`` in
      place.

    Raises:
      PartitionError: the two trees do not fit together (another structure, ``frozen`` not
        the second half of a `partition`, arrays missing from ``trainable`` or arrays there
        that never train).
      ShapeError: an array of ``trainable`` has another shape than its adapter expects.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> trainable, frozen = pj.partition(p)
      >>> q = pj.combine(trainable, frozen)
      >>> jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(p)
      True
    """

    def join(kp, f, t):
        if not is_adapted(f):
            if is_adapted(t) and any(a for a in t.arrays.values()):
                raise PartitionError(
                    f"`combine`: `trainable` has adapter arrays at `{_keystr(kp)}` "
                    f"({', '.join(n for n, a in t.arrays.items() if a)}) but the second tree has "
                    "a plain weight there: pass the `frozen` half of `pj.partition(params)`, not "
                    "the original params (the adapters would be dropped)."
                )
            return f
        if t is not None and not is_adapted(t):
            raise PartitionError(
                f"`combine`: at `{_keystr(kp)}` `frozen` has an adapted weight but `trainable` "
                f"has {type(t).__name__}; pass `(trainable, frozen)` from `pj.partition`."
            )
        if f.base is None and t is not None and t.base is not None:
            raise PartitionError(
                f"`combine`: at `{_keystr(kp)}` the second tree has no base weight but the first "
                "has one: the halves are swapped; call `pj.combine(trainable, frozen)` in the "
                "order `pj.partition` returns them."
            )
        arrays = {}
        for n, a in f.arrays.items():
            ta = t.arrays.get(n) if t is not None else None
            if ta is None:
                if _lacks_trainable(f, n, a):
                    raise PartitionError(
                        f"`combine`: adapter {n!r} at `{_keystr(kp)}` is trainable in `frozen`, "
                        "but `trainable` has no arrays for it; pass `(trainable, frozen)` from "
                        "the same `pj.partition` call."
                    )
                arrays[n] = a
                continue
            fixed = sorted(set(ta) & f.spec(n).frozen_arrays) if isinstance(ta, dict) else []
            if fixed:
                raise PartitionError(
                    f"`combine`: at `{_keystr(kp)}`, adapter {n!r} array(s) {fixed} never train "
                    f"(the `frozen_arrays` of {f.spec(n).describe()}, e.g. VeRA's shared "
                    "projections) but `trainable` has them: pass the `trainable` half of "
                    "`pj.partition(params)`, which keeps them in `frozen`."
                )
            want = _expected_shapes(f.spec(n))
            if want is not None and isinstance(ta, dict):
                for k, v in ta.items():
                    have = tuple(getattr(v, "shape", ()))
                    if k in want and have != want[k]:
                        raise ShapeError(
                            f"`combine`: at `{_keystr(kp)}`, adapter {n!r} array `{k}` has shape "
                            f"{list(have)} in `trainable` but the adapter in `frozen` expects "
                            f"{list(want[k])} (trees from different injections, e.g. another "
                            "rank?)."
                        )
            arrays[n] = {**a, **ta} if isinstance(a, dict) and isinstance(ta, dict) else ta
        return f.replace(arrays=arrays)

    try:
        return jax.tree_util.tree_map_with_path(join, frozen, trainable, is_leaf=is_weight_node)
    except PeftJaxError:
        raise
    except (ValueError, TypeError) as err:
        raise PartitionError(
            "`combine(trainable, frozen)`: the two trees do not have the same structure; pass "
            f"the two halves of one `pj.partition(params)`, in that order ({err})."
        ) from None


def trainable_mask(params):
    """A tree of bools with ``params``' structure, True on the trainable adapter arrays.

    Note: ``optax.masked(tx, mask)`` alone passes the *raw gradients* of masked-out leaves
    through as updates, which would change frozen weights; use `adapter_optimizer` (or chain a
    masked ``optax.set_to_zero()`` for the complement) when training a single full tree.

    Args:
      params: the adapter-carrying tree.

    Returns:
      A tree of Python bools with the structure of ``params``, ``True`` on the arrays
      `partition` puts in ``trainable`` and ``False`` everywhere else.

    Raises:
      Nothing: any pytree is accepted.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> jax.tree_util.tree_leaves(pj.trainable_mask(p))  # base, lora_A, lora_B
      [False, True, True]
    """
    t, _ = partition(params)
    full = jax.tree_util.tree_map(lambda x: x, params, is_leaf=is_weight_node)

    def mark(node, tn):
        if not is_adapted(node):
            return False

        def on(n, a):
            t = tn.arrays[n]
            if isinstance(a, dict):  # per array: a spec's `frozen_arrays` stay False
                return {k: isinstance(t, dict) and k in t for k in a}
            return jax.tree_util.tree_map(lambda _: t is not None, a)

        return node.replace(base=False, arrays={n: on(n, a) for n, a in node.arrays.items()})

    return jax.tree_util.tree_map(mark, full, t, is_leaf=is_weight_node)


def _size(x) -> int:
    return int(np.prod(getattr(x, "shape", ()))) if x is not None else 0


def count_parameters(params) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts, as HF PEFT's ``get_nb_trainable_parameters``:
    all = base weights plus every adapter's arrays; trainable = active, unmerged adapters that
    are not frozen. Stacked layer slices excluded by ``layers_to_transform`` store nothing.

    Args:
      params: the adapter-carrying tree (or any pytree of arrays).

    Returns:
      ``(trainable, all)``, two ints.

    Raises:
      Nothing: any pytree is accepted (a leaf without ``shape`` counts as one parameter).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> pj.count_parameters(p)  # lora_A 4 * 2 + lora_B 2 * 3; all adds the 4 * 3 base
      (14, 26)
    """
    trainable = total = 0
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_weight_node):  # Quantized: its shape
        if is_adapted(x):
            live = _live(x)
            total += _size(x.base)
            for n in x.names:
                size = x.spec(n).parameter_count(x.arrays.get(n))
                total += size
                trainable += size if n in live else 0
        else:
            total += _size(x)
    return trainable, total


def _peft_line(params) -> str:
    trainable, total = count_parameters(params)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(params, print_fn=print) -> str:
    """Print HF PEFT's line: ``trainable params: T || all params: A || trainable%: P``.

    Args:
      params: the adapter-carrying tree; counted by `count_parameters`.
      print_fn: called with the line (default: ``print``); e.g. ``logging.info``.

    Returns:
      The line, as printed.

    Raises:
      TypeError: ``print_fn`` is not callable.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> line = pj.print_trainable_parameters(p)
      trainable params: 14 || all params: 26 || trainable%: 53.8462
    """
    line = _peft_line(params)
    print_fn(line)
    return line


def summary(params, print_fn=print) -> str:
    """Print PEFT's trainable-parameter line and a per-module table of adapters.

    Columns: module path, leaf, base shape and dtype, adapter (method and rank), its
    parameter count, and its state (active / merged / off; ``disabled`` while
    `pj.disable_adapters` has the module act as its base weight; ``frozen`` when not trainable).

    Args:
      params: the adapter-carrying tree.
      print_fn: called with the text (default: ``print``); e.g. ``logging.info``.

    Returns:
      The text, as printed (PEFT's line, then the table with one row per adapter and leaf).

    Raises:
      TypeError: ``print_fn`` is not callable.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> text = pj.summary(p)
      trainable params: 14 || all params: 26 || trainable%: 53.8462
      module  leaf    base           adapter             params  state
      ------  ------  -------------  ------------------  ------  ------
      fc      kernel  float32[4, 3]  default: lora(r=2)  14      active
    """
    from ._tree import walk

    rows = [("module", "leaf", "base", "adapter", "params", "state")]
    for l in walk(params)[0]:
        node = l.value
        if not is_adapted(node):
            continue
        base = f"{node.base.dtype}{list(node.base.shape)}"
        for n, spec in node.specs:
            count = spec.parameter_count(node.arrays[n])
            state = "merged" if n in node.merged else ("active" if n in node.active else "off")
            if node.disabled and state == "active":  # `pj.disable_adapters`: acts as the base
                state = "active, disabled"
            state += ", frozen" if n in node.frozen else ""
            rows.append((l.module, l.name, base, f"{n}: {spec.describe()}", f"{count:,d}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join([_peft_line(params), *lines])
    print_fn(text)
    return text


def adapter_optimizer(tx, params):
    """Wrap optax transformation ``tx`` for training a single full tree of ``params``.

    The trainable adapter arrays get ``tx``; every other leaf (base weights, inactive, merged
    or frozen adapters) gets a zero update and no optimizer state (``optax.set_to_zero``). For
    the leanest training, prefer `partition` / `combine`: gradients are then never computed
    for frozen weights at all.

    Args:
      tx: the optax ``GradientTransformation`` for the trainable adapter arrays.
      params: the adapter-carrying tree (its structure and `trainable_mask` are read).

    Returns:
      An optax ``GradientTransformation`` (``optax.multi_transform``) for trees of ``params``'
      structure.

    Raises:
      ArgumentTypeError: ``tx`` is not an optax ``GradientTransformation`` (it has no
        ``init`` and ``update``).

    Example:

      >>> import jax, jax.numpy as jnp, optax, peftjax as pj
      >>> p = pj.inject({"q": {"kernel": jnp.ones((4, 4))}},
      ...               pj.LoraConfig(r=2, target_modules=["q"]), key=jax.random.key(0))
      >>> opt = pj.adapter_optimizer(optax.sgd(0.1), p)
      >>> grads = jax.tree_util.tree_map(jnp.ones_like, p)
      >>> updates, state = opt.update(grads, opt.init(p), p)
      >>> new = optax.apply_updates(p, updates)
      >>> bool((new["q"]["kernel"].base == 1).all())  # the base weight did not move
      True
      >>> round(float(new["q"]["kernel"].arrays["default"]["lora_B"][0, 0]), 4)  # the adapter did
      -0.1
    """
    import optax

    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise ArgumentTypeError(
            f"`tx`: expected an optax GradientTransformation (with `init` and `update`), got "
            f"{type(tx).__name__} {tx!r:.80}."
        )
    labels = jax.tree_util.tree_map(
        lambda m: "adapter" if m else "frozen",
        trainable_mask(params),
        is_leaf=lambda x: isinstance(x, bool),
    )
    return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)
