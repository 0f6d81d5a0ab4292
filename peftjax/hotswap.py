"""Hotswapping an adapter without recompiling: HF PEFT 0.21's ``hotswap_adapter`` and
``prepare_model_for_compiled_hotswap`` (``peft/utils/hotswap.py``).

A ``jax.jit``-compiled function is keyed by its arguments' tree structure (which holds every
adapter's static `Spec`: rank, scaling, layout, ...) and their leaves' shapes, dtypes,
shardings and committedness. `hotswap` replaces adapter ``name``'s *arrays* and keeps all of
that bit-identical, so ``f = jax.jit(pj.apply(model.apply))`` serves the new adapter without a
retrace or a recompile.

**The scheme (exact).** peftjax keeps each module's LoRA scale as static Spec data, so a swap
cannot change it. Instead:

* `prepare_hotswap` pads every LoRA ``lora_A`` (its rank axis, the last) and ``lora_B`` (its
  rank axis, the one before the output axis) of adapter ``name`` with zeros up to
  ``target_rank``; the padded rank components contribute ``0`` to ``A @ B``, so every output is
  unchanged (DoRA too: its norm sees the same delta). Its specs record the new rank and keep
  their scaling (the *prepared scale* ``s_p`` of each layer).
* `hotswap` writes the new adapter's ``A``, ``s_new / s_p * B`` and (DoRA) magnitude, rank
  padded with zeros up to the prepared rank. LoRA's delta is ``s * A @ B`` and DoRA's norm and
  forward see ``B`` only through ``s * B`` too, so with the prepared scale the module computes
  exactly the new adapter's ``s_new * A @ B``: any rank up to the prepared one, any
  ``lora_alpha`` / ``alpha_pattern`` / ``rank_pattern``, rsLoRA or not.
* A layer whose prepared scale is ``0`` (``pj.set_scale(..., 0)`` or ``lora_alpha=0``) cannot
  carry a scaled delta: swapping in a nonzero delta there raises. A new scale of ``0`` there, or
  anywhere, gives a zero ``B``.

**Saving a swapped adapter.** `pj.save_pretrained` writes what the tree holds: the prepared rank
(``r`` = the padded rank, zero rank components included) and the prepared scale (``lora_alpha =
s_p * r``) with the folded ``B``. The file loads back (in peftjax or PEFT) to exactly the same
outputs, but it is not byte-identical to the file swapped in, and is larger when padded.

Where peftjax follows PEFT and where it differs:

* Only LoRA (incl. DoRA and rsLoRA) swaps with different ranks or scales, as in PEFT. Another
  method swaps only when the new adapter's spec on every module equals the old one (same
  settings, ranks and scales) and its arrays have the same shapes; otherwise the error says so.
* A module the new adapter adapts and the old one does not is refused (PEFT: "unexpected keys").
  A module (or a stacked layer slice) the old one adapts and the new one does not gets a zero
  ``A`` and ``B`` (PEFT zeroes the missing keys); for DoRA the magnitude becomes the base
  weight's column norm, so the module is the base layer (PEFT zeroes the magnitude too, which
  zeroes the layer's output).
* PEFT requires equal ``use_rslora``, ``lora_dropout``, ``alpha_pattern`` and ``use_dora``.
  peftjax requires equal ``use_dora`` and ``lora_dropout`` (the dropout rate is static spec data)
  and allows different ``use_rslora`` / alphas, which the scheme above makes exact.
* A merged adapter is refused (PEFT too); `pj.unmerge` first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import Leaf, rebuild, walk
from .errors import (
    AdapterNameError,
    AdapterNameTypeError,
    ArgumentTypeError,
    ConfigError,
    MergeError,
    ShapeError,
    TargetError,
)
from .methods import DELTA, Spec
from .node import Adapted, is_adapted
from .quantize import is_quantized

__all__ = ["hotswap", "prepare_hotswap"]

_A, _B, _MAG = "lora_A", "lora_B", "lora_magnitude_vector"
_PEFT_LORA_ONLY = "HF PEFT's hotswap supports LoRA only"


# ------------------------------------------------------------------------------------- helpers


def _is_lora(spec: Spec) -> bool:
    return spec.hotswap and spec.role == DELTA


def _where(l: Leaf, spec: Spec | None = None, layer: int | None = None) -> str:
    at = f"module `{l.module}`" + (f" (leaf `{l.name}`)" if l.name else "")
    if layer is not None and spec is not None and spec.layout.stack:
        at += f", layer slice {layer}"
    return at


def _check_name(name, field: str = "name") -> None:
    if not isinstance(name, str):
        raise AdapterNameTypeError(
            f"`{field}`: expected an adapter name (str), got {type(name).__name__} {name!r}."
        )


def _carriers(leaves: list[Leaf], name: str, field: str, what: str) -> list[Leaf]:
    """The leaves carrying adapter ``name`` (refusing a merged one)."""
    out = [l for l in leaves if is_adapted(l.value) and name in l.value.names]
    if not out:
        have = sorted({n for l in leaves if is_adapted(l.value) for n in l.value.names})
        raise AdapterNameError(f"`{field}`: {what} has no adapter named {name!r}; it has {have}.")
    for l in out:
        if name in l.value.merged:
            raise MergeError(
                f"adapter {name!r} ({what}) is merged into the base weights at {_where(l)}: a "
                "merged adapter cannot be hotswapped (PEFT refuses too); `pj.unmerge` it first."
            )
    return out


def _flat(spec: Spec, v):
    """An array with one leading axis over the spec's stored layer slices."""
    if spec.compact:
        return v
    stack = spec.layout.stack_shape(spec.shape)
    if not stack:
        return v[None]
    return v.reshape((spec.n_layers,) + v.shape[len(stack) :])


def _unflat(spec: Spec, v):
    if spec.compact:
        return v
    stack = spec.layout.stack_shape(spec.shape)
    if not stack:
        return v[0]
    return v.reshape(tuple(stack) + v.shape[1:])


def _pad_rank(v, axis: int, r: int):
    have = v.shape[axis]
    if have == r:
        return v
    widths = [(0, 0)] * v.ndim
    widths[axis] = (0, r - have)
    return jnp.pad(v, widths)


def _like(new, old):
    """``new`` with ``old``'s dtype, sharding and committedness (the jit cache key)."""
    dt = getattr(old, "dtype", None)
    if isinstance(old, jax.core.Tracer) or not isinstance(old, jax.Array):
        if isinstance(old, np.ndarray):
            return np.asarray(new, dt)
        return jnp.asarray(new, dt)
    if not old.committed:  # an uncommitted array lives on the default device
        return jnp.asarray(np.asarray(new).astype(dt))
    return jax.device_put(jnp.asarray(new, dt), old.sharding)


def _base_matrix_norms(spec: Spec, base):
    """Column norms of each stored layer's ``(in, out)`` matrix view, ``(k, out)`` float32."""
    w = base.dense() if is_quantized(base) else base
    w = jnp.asarray(w, jnp.float32)
    stack = spec.layout.stack_shape(spec.shape)
    if not stack:
        flat = w[None]
    else:
        flat = w.reshape((spec.n_layers,) + spec.layer_shape)[np.asarray(spec.stored_layers)]
    mats = jax.vmap(spec.to_matrix)(flat)
    return jnp.sqrt(jnp.sum(jnp.square(mats), axis=1))


# ------------------------------------------------------------------------------------ prepare


def prepare_hotswap(params, name: str = "default", *, target_rank: int | None = None):
    """PEFT's ``prepare_model_for_compiled_hotswap``: ready adapter ``name`` to take other LoRA
    adapters of rank up to ``target_rank`` (and any scale) by `hotswap`, without a recompile.

    Every LoRA ``lora_A`` / ``lora_B`` of ``name`` is zero-padded to ``target_rank`` (its spec's
    ``r`` becomes ``target_rank``, its scaling is kept): outputs are unchanged. Scales need no
    preparation: `hotswap` folds a new scale into ``lora_B`` (module docstring). Call it before
    compiling the serving function; with ``target_rank=None`` it only checks ``name``.

    Args:
      params: a params tree carrying LoRA adapter ``name`` (never modified).
      name: the adapter to prepare.
      target_rank: the largest rank among the adapters that will be swapped in; ``None``: keep
        the ranks.

    Returns:
      A new params tree.

    Raises:
      AdapterNameError: no adapter ``name``.
      MergeError: ``name`` is merged.
      ConfigError: ``name`` is not a LoRA adapter (PEFT's hotswap supports LoRA only).
      ShapeError: a module's rank exceeds ``target_rank``.
      ArgumentTypeError: ``target_rank`` is not a positive int.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> q = pj.prepare_hotswap(p, target_rank=8)
      >>> q["fc"]["kernel"].arrays["default"]["lora_A"].shape
      (4, 8)
    """
    _check_name(name)
    if target_rank is not None and (
        isinstance(target_rank, (bool, np.bool_))
        or not isinstance(target_rank, (int, np.integer))
        or target_rank < 1
    ):
        raise ArgumentTypeError(
            f"`target_rank`: expected a positive int or None, got {target_rank!r}."
        )
    leaves, treedef = walk(params)
    carriers = _carriers(leaves, name, "name", "params")
    lora = []
    for l in carriers:
        spec = l.value.spec(name)
        if _is_lora(spec):
            lora.append(l)
        elif spec.role == DELTA:
            raise ConfigError(
                f"`prepare_hotswap`: adapter {name!r} is {spec.method} at {_where(l)}; "
                f"{_PEFT_LORA_ONLY} (peftjax swaps other methods only between adapters of "
                "identical settings and shapes, which needs no preparation)."
            )
    if not lora:
        raise ConfigError(f"`prepare_hotswap`: adapter {name!r} has no LoRA module.")
    if target_rank is not None:
        for l in lora:
            r = l.value.spec(name).r
            if r > target_rank:
                raise ShapeError(
                    f"`prepare_hotswap`: at {_where(l)}, adapter {name!r} has rank {r}, more "
                    f"than `target_rank={target_rank}`; pass the largest rank of the adapters "
                    "to swap in."
                )
    out = []
    for l in leaves:
        if target_rank is not None and any(l is x for x in lora):
            node: Adapted = l.value
            spec = node.spec(name)
            arrays = dict(node.arrays[name])
            arrays[_A] = _like(_pad_rank(arrays[_A], -1, target_rank), arrays[_A])
            arrays[_B] = _like(_pad_rank(arrays[_B], -2, target_rank), arrays[_B])
            lora_spec: Any = spec  # a hotswap spec (checked above): LoRA's, with a rank `r`
            new_spec = dataclasses.replace(lora_spec, r=int(target_rank))
            specs = tuple((n, new_spec if n == name else s) for n, s in node.specs)
            l = dataclasses.replace(
                l, value=node.replace(arrays={**node.arrays, name: arrays}, specs=specs)
            )
        out.append(l)
    return rebuild(treedef, out)


# ------------------------------------------------------------------------------------ hotswap


def _derived_layouts(carriers: list[Leaf], name: str) -> dict[str, Any]:
    lay: dict[str, Any] = {}
    for l in carriers:
        spec = l.value.spec(name)
        if l.module not in lay or spec.role == DELTA:
            lay[l.module] = spec.layout
    return lay


def _source(params, carriers, source, name, source_name, key_map, layouts):
    """``(source leaves, source adapter name, what)``."""
    if isinstance(source, (str, os.PathLike)):
        from .io import load_pretrained
        from .transforms import unload

        if source_name is not None:
            raise ArgumentTypeError(
                "`source_name` is for a params tree; a PEFT directory holds one adapter."
            )
        if layouts is None:
            lay = _derived_layouts(carriers, name)
            layouts = lambda path, leaf: lay.get(path)  # noqa: E731
        loaded = load_pretrained(
            unload(params), source, name=name, key_map=key_map, layouts=layouts
        )
        return walk(loaded)[0], name, f"the adapter in `{os.fspath(source)}`"
    leaves = walk(source)[0]
    names = list(dict.fromkeys(n for l in leaves if is_adapted(l.value) for n in l.value.names))
    if not names:
        raise ArgumentTypeError(
            "`path_or_params`: expected a PEFT adapter directory (str or os.PathLike) or a params "
            f"tree carrying an adapter, got {type(source).__name__} without adapters."
        )
    if source_name is None:
        if name in names:
            source_name = name
        elif len(names) == 1:
            source_name = names[0]
        else:
            raise AdapterNameError(
                f"`source_name`: the source tree has adapters {names} and none is named {name!r}; "
                "say which one to swap in."
            )
    _check_name(source_name, "source_name")
    return leaves, source_name, f"source adapter {source_name!r}"


def _check_same(l: Leaf, name: str, so: Spec, sn: Spec, fields: tuple[str, ...]) -> None:
    for f in fields:
        a, b = getattr(so, f), getattr(sn, f)
        if a != b:
            raise ConfigError(
                f"`hotswap`: at {_where(l)}, adapter {name!r} has `{f}={a!r}` and the new adapter "
                f"`{f}={b!r}`; they must match to swap without recompiling."
            )


def _plan_lora(l: Leaf, name: str, so, ao, sn, an) -> dict:
    """Checks of one LoRA module; the recipe of its new arrays."""
    if sn is None:  # not adapted by the new adapter: zeros (PEFT's missing keys)
        return dict(missing=True)
    if not _is_lora(sn):
        raise ConfigError(
            f"`hotswap`: at {_where(l)}, adapter {name!r} is LoRA but the new adapter is "
            f"{sn.method}; {_PEFT_LORA_ONLY}, between adapters of the same kind."
        )
    if so.use_dora != sn.use_dora:
        raise ConfigError(
            f"`hotswap`: at {_where(l)}, adapter {name!r} is "
            f"{'DoRA' if so.use_dora else 'LoRA'} and the new adapter "
            f"{'DoRA' if sn.use_dora else 'LoRA'}; `use_dora` must match (PEFT's rule too)."
        )
    _check_same(l, name, so, sn, ("layout", "shape", "lora_dropout", "target_parameter", "nest"))
    if so.carries_base or sn.carries_base:
        raise ConfigError(
            f"`hotswap`: at {_where(l)}, an adapter carries its module's base weights "
            "(PEFT's `save_embedding_layers`); such adapters cannot be hotswapped."
        )
    if sn.r > so.r:
        raise ShapeError(
            f"`hotswap`: at {_where(l)}, the new adapter has rank {sn.r} but adapter {name!r} "
            f"has rank {so.r}; call `pj.prepare_hotswap(params, {name!r}, target_rank=R)` with "
            "R at least the largest rank you will swap in, before compiling."
        )
    if set(an) != set(ao):
        raise ShapeError(
            f"`hotswap`: at {_where(l)}, the new adapter has arrays {sorted(an)} and adapter "
            f"{name!r} {sorted(ao)}."
        )
    old_layers = set(so.stored_layers)
    extra = [i for i in sn.stored_layers if i not in old_layers]
    if extra:
        raise TargetError(
            f"`hotswap`: at {_where(l)}, the new adapter adapts layer slice(s) {extra} that "
            f"adapter {name!r} does not; hotswapping cannot add adapted layers."
        )
    for i in sn.stored_layers:
        if so.scaling[i] == 0 and sn.scaling[i] != 0:
            raise ConfigError(
                f"`hotswap`: at {_where(l, so, i)}, adapter {name!r} has scale 0, so it cannot "
                f"carry the new adapter's scale {sn.scaling[i]} (it is folded into lora_B); "
                "give it a nonzero scale (`pj.set_scale`) before compiling."
            )
    return dict(missing=False)


def _lora_arrays(node: Adapted, name: str, so, ao, sn, an) -> dict:
    """The new adapter's arrays in the prepared shapes (module docstring)."""
    k = len(so.stored_layers)
    pos = {} if sn is None else {i: j for j, i in enumerate(sn.stored_layers)}
    idx = np.asarray([pos.get(i, 0) for i in so.stored_layers])
    present = np.asarray([i in pos for i in so.stored_layers])
    s_old = np.asarray([so.scaling[i] for i in so.stored_layers], np.float64)
    s_new = np.asarray([sn.scaling[i] if i in pos else 0.0 for i in so.stored_layers], np.float64)
    factor = np.where(s_old != 0, s_new / np.where(s_old != 0, s_old, 1.0), 0.0)
    fo = {n: _flat(so, v) for n, v in ao.items()}
    out = {}
    if sn is None:
        a = jnp.zeros(fo[_A].shape, jnp.float32)
        b = jnp.zeros(fo[_B].shape, jnp.float32)
    else:
        fn = {n: _flat(sn, v) for n, v in an.items()}
        keep = jnp.asarray(present.astype(np.float32))
        a = jnp.take(jnp.asarray(fn[_A], jnp.float32), idx, axis=0)
        a = a * keep.reshape((k,) + (1,) * (a.ndim - 1))
        b = jnp.take(jnp.asarray(fn[_B], jnp.float32), idx, axis=0)
        b = b * jnp.asarray(factor, jnp.float32).reshape((k,) + (1,) * (b.ndim - 1))
    out[_A] = _pad_rank(a, -1, so.r)
    out[_B] = _pad_rank(b, -2, so.r)
    if so.use_dora:
        shape = fo[_MAG].shape
        on = present & (s_new != 0)
        if sn is not None:
            m = jnp.take(jnp.asarray(fn[_MAG], jnp.float32), idx, axis=0).reshape(k, -1)
        else:
            m = jnp.zeros((k, int(np.prod(shape[1:]))), jnp.float32)
        if not on.all():  # the base layer: g = m / ||W|| = 1
            norms = _base_matrix_norms(so, node.base).reshape(k, -1)
            m = jnp.where(jnp.asarray(on)[:, None], m, norms)
        out[_MAG] = m.reshape(shape)
    return {n: _like(_unflat(so, v), ao[n]) for n, v in out.items()}


def _check_plain(l: Leaf, name: str, so, ao, sn, an) -> None:
    if sn is None:
        raise TargetError(
            f"`hotswap`: the new adapter does not adapt {_where(l)}, where adapter {name!r} is "
            f"{so.method}; only LoRA modules can be left out (they are zeroed, PEFT's rule)."
        )
    if sn != so:
        diff = [
            f.name
            for f in dataclasses.fields(so)
            if not isinstance(sn, type(so)) or getattr(so, f.name) != getattr(sn, f.name)
        ]
        raise ConfigError(
            f"`hotswap`: at {_where(l)}, adapter {name!r} is {so.method} and the new adapter "
            f"{sn.method} with different settings ({', '.join(diff) or 'method'}); "
            f"{_PEFT_LORA_ONLY}: other methods swap only between adapters whose settings, ranks "
            "and scales are identical."
        )
    if set(an) != set(ao):
        raise ShapeError(
            f"`hotswap`: at {_where(l)}, the new adapter has arrays {sorted(an)} and adapter "
            f"{name!r} {sorted(ao)}."
        )
    for k, v in ao.items():
        if tuple(np.shape(an[k])) != tuple(np.shape(v)):
            raise ShapeError(
                f"`hotswap`: at {_where(l)}, array `{k}` of the new adapter has shape "
                f"{tuple(np.shape(an[k]))}, adapter {name!r} has {tuple(np.shape(v))}."
            )


def _plain_arrays(ao, an) -> dict:
    return {k: _like(an[k], v) for k, v in ao.items()}


def hotswap(
    params,
    path_or_params,
    name: str = "default",
    *,
    source_name: str | None = None,
    key_map=None,
    layouts=None,
):
    """PEFT's ``hotswap_adapter``: adapter ``name``'s arrays replaced by another adapter's,
    with the tree's structure (every spec, the active / merged / frozen names) and every leaf's
    shape, dtype and sharding kept, so a compiled function runs it without recompiling.

    The new adapter computes exactly what it computes when loaded normally: LoRA / DoRA /
    rsLoRA of any rank up to adapter ``name``'s (see `prepare_hotswap`) and any scale (folded
    into ``lora_B``, module docstring). A module the new adapter leaves out is zeroed.

    Args:
      params: a params tree carrying adapter ``name`` (never modified).
      path_or_params: a PEFT adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``, from PEFT or `pj.save_pretrained`), or a params tree
        carrying the new adapter (same tree paths as ``params``).
      name: the adapter to replace; it keeps its name.
      source_name: the new adapter's name in a params tree (default: ``name`` if the tree has
        it, else its only adapter).
      key_map: as `pj.load_pretrained`, for a directory.
      layouts: as `pj.load_pretrained`, for a directory; default: the layouts of ``name``'s
        modules.

    Returns:
      A new params tree with the same treedef, leaf shapes, dtypes and shardings.

    Raises:
      AdapterNameError: no adapter ``name`` (or ``source_name``).
      MergeError: either adapter is merged.
      TargetError: the new adapter adapts a module (or layer slice) that ``name`` does not, or
        leaves out a non-LoRA module.
      ShapeError: a rank larger than ``name``'s (call `prepare_hotswap`), arrays that differ.
      ConfigError: different methods, DoRA vs LoRA, different dropout or layout; a non-LoRA
        adapter whose settings differ; a nonzero scale swapped into a layer of scale 0.
      FormatError: an unreadable adapter directory.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
      >>> p = pj.inject(base, pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> new = pj.inject(base, pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"],
      ...                                     init_lora_weights=False), key=1)
      >>> f = jax.jit(pj.apply(lambda p, x: x @ p["fc"]["kernel"]))
      >>> x = jnp.ones((1, 4))
      >>> y0 = f(p, x)
      >>> y1 = f(pj.hotswap(p, new), x)
      >>> bool(jnp.allclose(y1, pj.apply(lambda p, x: x @ p["fc"]["kernel"])(new, x)))
      True
      >>> f._cache_size()
      1
    """
    _check_name(name)
    leaves, treedef = walk(params)
    carriers = _carriers(leaves, name, "name", "params")
    src_leaves, sname, what = _source(
        params, carriers, path_or_params, name, source_name, key_map, layouts
    )
    src = {
        l.names: l
        for l in _carriers(src_leaves, sname, "source_name", "the source")
        if is_adapted(l.value)
    }
    mine = {l.names for l in carriers}
    extra = sorted(l.module for n, l in src.items() if n not in mine)
    if extra:
        raise TargetError(
            f"`hotswap`: {what} adapts module(s) {extra} that adapter {name!r} does not; "
            "hotswapping cannot add adapted modules (PEFT: unexpected keys)."
        )
    # pass 1: every check, on static information
    jobs: list[tuple[Any, Any, tuple]] = []
    for l in carriers:
        node: Adapted = l.value
        so, ao = node.spec(name), node.arrays[name]
        s = src.get(l.names)
        sn = s.value.spec(sname) if s is not None else None
        an = s.value.arrays[sname] if s is not None else None
        if _is_lora(so):
            _plan_lora(l, name, so, ao, sn, an)
            jobs.append((l, _lora_arrays, (node, name, so, ao, sn, an)))
        else:
            _check_plain(l, name, so, ao, sn, an)
            jobs.append((l, _plain_arrays, (ao, an)))
    # pass 2: the arrays
    new = {}
    for l, fn, args in jobs:
        new[l.index] = fn(*args)
    out = []
    for l in leaves:
        if l.index in new:
            node = l.value
            l = dataclasses.replace(
                l, value=node.replace(arrays={**node.arrays, name: new[l.index]})
            )
        out.append(l)
    return rebuild(treedef, out)
