"""Adapters on a device mesh: their shardings follow the base weight's.

JAX's SPMD engine does the distributed work (meshes, ``NamedSharding``, ``jax.jit`` with
shardings, ``jax.distributed``); this module only says where each adapter array lives. The rule:
an adapter array's axes are named, in its method's module (`Spec.sharding_roles`), by what they
are on the base weight's *matrix view* (see `peftjax.layout`):

* ``IN`` / ``OUT``: the view's input / output axis. It takes the base weight's sharding of that
  axis: a plain dense kernel ``(in, out)`` sharded ``P("fsdp", "tensor")`` gives LoRA's
  ``A (in, r)`` ``P("fsdp", None)`` and ``B (r, out)`` ``P(None, "tensor")``. A view axis that
  flattens several weight axes (a DenseGeneral ``(embed, heads, head_dim)`` kernel's output)
  takes the sharding of its leading axis when that is the only sharded one (the flattened
  blocks are then the same rows), and is replicated otherwise.
* an ``int`` ``k``: the weight's own layer axis ``k`` (a conv LoRA ``A`` keeps the kernel's
  spatial and input-channel axes; a full copy keeps every axis).
* ``RANK``: the rank axis: replicated, unless ``rank_axis=`` names a mesh axis to split it over.
* ``None``: replicated.

Stacked (scanned) layer axes keep the weight's layer-axis sharding. An axis whose length the
mesh axes cannot divide (OFT's blocks on a split the blocks do not fill) is replicated rather
than sharded unevenly, except a requested ``rank_axis``, which is an error.

`shardings` is the pure helper for ``jax.jit(in_shardings=..., out_shardings=...)`` and for
sharded initialisation of a model too big for one device; `place` is what `pj.inject`,
`pj.load_pretrained` and the merges use to put concrete adapter arrays where the rule says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec, Sharding

from ._tree import dotted, keypath_to_names
from .errors import ArgumentTypeError, ShardingError
from .methods.base import IN, OUT, RANK, Spec
from .node import Adapted, is_adapted

AnyMesh = Mesh | AbstractMesh

__all__ = ["ShardingError", "array_spec", "place", "shardings"]


Entry = Any  # one PartitionSpec entry: None, a mesh axis name, or a tuple of names


# ------------------------------------------------------------------------------- the rule


def _names_of(entry: Entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _size(entry: Entry, axis_sizes: Mapping[str, int]) -> int:
    return math.prod(axis_sizes[a] for a in _names_of(entry))


def _flat_entry(entries: list[Entry], sizes: list[int]) -> Entry:
    """The sharding of one axis that row-major flattens axes with these entries and sizes."""
    sharded = [i for i, e in enumerate(entries) if _names_of(e)]
    if not sharded:
        return None
    i = sharded[0]
    if len(sharded) == 1 and all(sizes[j] == 1 for j in range(i)):
        return entries[i]
    return None


def view_axes(spec: Spec, entries: tuple[Entry, ...]) -> tuple[tuple, tuple, Entry, Entry]:
    """``(stack entries, layer entries, IN entry, OUT entry)`` of a weight of ``spec``'s shape
    sharded with ``entries`` (one per weight axis)."""
    lay, shape = spec.layout, tuple(spec.shape)
    st = lay.stack
    stack, layer = tuple(entries[:st]), tuple(entries[st:])
    ls = list(shape[st:])
    nd = len(ls)
    if lay.kind == "dense" and lay.transposed:
        ins, outs = list(range(nd - lay.n_in, nd)), list(range(nd - lay.n_in))
    elif lay.kind == "dense":
        ins, outs = list(range(lay.n_in)), list(range(lay.n_in, nd))
    elif lay.kind == "conv":  # the view's rows run (in, *spatial)
        ins, outs = [nd - 2, *range(nd - 2)], [nd - 1]
    else:
        ins, outs = [0], [1]
    flat = lambda axes: _flat_entry([layer[a] for a in axes], [ls[a] for a in axes])
    return stack, layer, flat(ins), flat(outs)


def array_spec(
    spec: Spec,
    array: str,
    shape: tuple[int, ...],
    entries: tuple[Entry, ...],
    axis_sizes: Mapping[str, int],
    *,
    rank_axis: str | None = None,
    where: str = "",
) -> PartitionSpec:
    """The `PartitionSpec` of adapter array ``array`` (of ``shape``) on a weight sharded
    ``entries``, by the rule of `spec`'s method (`Spec.sharding_roles`)."""
    roles = spec.sharding_roles().get(array)
    nd = len(shape)
    if roles is None or array in spec.shared:
        return PartitionSpec(*([None] * nd))
    stack, layer, e_in, e_out = view_axes(spec, entries)
    n_stack = nd - len(roles)
    if n_stack < 0 or n_stack > len(stack) + 1:
        return PartitionSpec(*([None] * nd))
    if spec.compact or n_stack != len(stack):  # one axis of the stored layers
        lead = [stack[0] if len(stack) == 1 else None] * n_stack
    else:
        lead = list(stack)
    out: list[Entry] = []
    for role in roles:
        if role == IN:
            out.append(e_in)
        elif role == OUT:
            out.append(e_out)
        elif role == RANK:
            out.append(rank_axis)
        elif isinstance(role, int):
            out.append(layer[role] if role < len(layer) else None)
        else:
            out.append(None)
    full = lead + out
    for i, e in enumerate(full):
        if not _names_of(e):
            full[i] = None
            continue
        if shape[i] % _size(e, axis_sizes):
            if i >= n_stack and roles[i - n_stack] == RANK:
                raise ShardingError(
                    f"module `{where}`: `rank_axis={rank_axis!r}` splits over "
                    f"{_size(e, axis_sizes)} devices, which does not divide the rank axis "
                    f"(length {shape[i]}) of adapter array `{array}` {tuple(shape)}; pick a rank "
                    "the axis divides or leave the rank replicated (`rank_axis=None`)."
                )
            full[i] = None  # uneven: replicate this axis
    return PartitionSpec(*full)


# --------------------------------------------------------------------- reading base shardings


def _entries(pspec: PartitionSpec, shape: tuple[int, ...], mesh: AnyMesh, where: str) -> tuple:
    """``pspec`` checked against the weight and the mesh, padded to one entry per axis."""
    if len(pspec) > len(shape):
        raise ShardingError(
            f"`{where}`: PartitionSpec {pspec} has {len(pspec)} entries but the array has "
            f"shape {tuple(shape)} ({len(shape)} axes)."
        )
    used: list[str] = []
    for e in pspec:
        for a in _names_of(e):
            if a not in mesh.shape:
                raise ShardingError(
                    f"`{where}`: PartitionSpec {pspec} names mesh axis {a!r}, but the mesh has "
                    f"axes {tuple(mesh.axis_names)}; map logical axis names with `rules=`."
                )
            if a in used:
                raise ShardingError(f"`{where}`: PartitionSpec {pspec} uses mesh axis {a!r} twice.")
            used.append(a)
    return tuple(pspec) + (None,) * (len(shape) - len(pspec))


def _logical(pspec: PartitionSpec, rules) -> PartitionSpec:
    if rules is None:
        return pspec
    import flax.linen as nn

    out = nn.logical_to_mesh_axes(tuple(pspec), rules)
    return PartitionSpec() if out is None else out


def _base_leaves(base) -> list[tuple[tuple[str, ...], Any]]:
    """``[(names, sharding-like)]`` of a base sharding tree (Shardings, PartitionSpecs, ``None``,
    linen boxed params, nnx state with sharding metadata)."""
    import flax.linen as nn
    import flax.nnx as nnx

    if isinstance(base, nnx.State):
        base = nnx.get_partition_spec(base)
    elif any(
        isinstance(x, nn.Partitioned)
        for x in jax.tree_util.tree_leaves(base, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    ):
        base = nn.get_partition_spec(base)
    is_leaf = lambda x: x is None or isinstance(x, (PartitionSpec, Sharding))
    flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_leaf)[0]
    return [(keypath_to_names(kp), v) for kp, v in flat]


def _resolve(value, shape, mesh, rules, where) -> tuple[Sharding, tuple | None]:
    """``(sharding, entries)`` of one base leaf; entries ``None`` for a non-named sharding."""
    if isinstance(value, NamedSharding):
        spec = _logical(value.spec, rules) if rules is not None else value.spec
        return NamedSharding(value.mesh, spec), _entries(spec, shape, value.mesh, where)
    if isinstance(value, Sharding):
        return value, None
    if value is not None and not isinstance(value, PartitionSpec):
        raise ArgumentTypeError(
            f"`base` at `{where}`: expected a Sharding, a PartitionSpec or None, got "
            f"{type(value).__name__} {value!r}."
        )
    if mesh is None:
        raise ShardingError(
            f"`base` at `{where}` is a PartitionSpec ({value}); pass `mesh=` to turn it into a "
            "NamedSharding."
        )
    spec = _logical(value or PartitionSpec(), rules)
    ent = _entries(spec, shape, mesh, where)
    return NamedSharding(mesh, spec), ent


def _map_arrays(node: Adapted, fn) -> dict:
    """``node.arrays`` with each array ``v`` of adapter ``n``, key ``k`` replaced by
    ``fn(n, k, v)``; ``None`` entries and non-dict values (a `partition` half) kept."""
    return {
        n: {k: None if v is None else fn(n, k, v) for k, v in a.items()}
        if isinstance(a, dict)
        else a
        for n, a in node.arrays.items()
    }


def _adapter_shardings(node: Adapted, entries, mesh, rank_axis, where) -> dict:
    sizes = dict(mesh.shape)

    def one(n, k, v):
        spec = array_spec(
            node.spec(n), k, tuple(v.shape), entries, sizes, rank_axis=rank_axis, where=where
        )
        return NamedSharding(mesh, spec)

    return _map_arrays(node, one)


def _replicated_like(node: Adapted, sharding: Sharding) -> dict:
    return _map_arrays(node, lambda n, k, v: sharding)


def _check_rank_axis(rank_axis, meshes):
    if rank_axis is None:
        return
    if not isinstance(rank_axis, str):
        raise ArgumentTypeError(
            f"`rank_axis`: expected a mesh axis name or None, got {rank_axis!r}."
        )
    for m in meshes:
        if rank_axis not in m.shape:
            raise ShardingError(
                f"`rank_axis={rank_axis!r}`: the mesh has axes {tuple(m.axis_names)}."
            )


def shardings(tree, base=None, *, mesh: Mesh | None = None, rules=None, rank_axis=None):
    """The shardings of an adapter-carrying tree, from the base params' shardings.

    Pure: reads shapes only, so ``tree`` may be abstract (``jax.eval_shape`` of `pj.inject` on
    an abstract model), and the result is a tree of the same structure as ``tree`` (`Adapted`
    nodes included) with a `jax.sharding.Sharding` per array: pass it to ``jax.jit``'s
    ``in_shardings`` / ``out_shardings`` or ``jax.device_put``.

    Args:
      tree: the params with adapters (arrays or ``jax.ShapeDtypeStruct``); a plain tree works
        too (its own shardings are returned).
      base: the base params' shardings, a tree with the structure of the params *before*
        `inject`: its leaves ``NamedSharding``, ``PartitionSpec`` (with ``mesh``) or ``None``
        (replicated, with ``mesh``). Also a linen tree boxed by ``nn.with_partitioning`` /
        ``nn.with_logical_partitioning`` or an nnx ``State`` with sharding metadata. Default:
        each base leaf's own ``.sharding`` (concrete arrays, or ``ShapeDtypeStruct``s made with
        ``sharding=``).
      mesh: the mesh for ``PartitionSpec`` / ``None`` leaves.
      rules: logical-axis rules (``[(logical name, mesh axis or None), ...]``, flax's
        ``logical_axis_rules``) that turn logical names in the specs into mesh axes.
      rank_axis: a mesh axis to split adapter ranks over (default: ranks are replicated).

    Returns:
      A tree like ``tree`` whose leaves are shardings.

    Raises:
      ShardingError: ``base`` does not have the params' structure, a spec names an axis the
        mesh lacks or has more entries than its array has axes, ``rank_axis`` does not divide
        a rank or is not a mesh axis, a ``PartitionSpec`` leaf without ``mesh``, or (``base``
        omitted) a leaf without a sharding; the message names the module path.
      ArgumentTypeError: ``mesh`` is not a ``Mesh``, a leaf of ``base`` is not a sharding, a
        ``PartitionSpec`` or ``None``, or ``rank_axis`` is not a str.

    Example:

      >>> import jax, jax.numpy as jnp, numpy as np, peftjax as pj
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("tensor",))
      >>> p = pj.inject({"q": {"kernel": jnp.ones((4, 6))}},
      ...               pj.LoraConfig(r=2, target_modules=["q"]), key=0)
      >>> s = pj.shardings(p, {"q": {"kernel": P(None, "tensor")}}, mesh=mesh)
      >>> s["q"]["kernel"].arrays["default"]["lora_B"].spec
      P(None, 'tensor')
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ArgumentTypeError(f"`mesh`: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
    names = [keypath_to_names(kp) for kp, _ in flat]
    if base is None:
        given: list[Any] = [None] * len(flat)
        for i, (_, v) in enumerate(flat):
            b = v.base if is_adapted(v) else v
            s = getattr(b, "sharding", None)
            if not isinstance(s, Sharding):
                raise ShardingError(
                    f"`{dotted(names[i]) or '<root>'}` has no sharding (an abstract leaf made "
                    "without `sharding=`); pass the base shardings as `base=`."
                )
            given[i] = s
    else:
        pairs = _base_leaves(base)
        got = [n for n, _ in pairs]
        if got != names:
            missing = [dotted(n) for n in names if n not in got]
            extra = [dotted(n) for n in got if n not in names]
            first = next((i for i, (a, b) in enumerate(zip(names, got)) if a != b), None)
            raise ShardingError(
                "`base` does not have the structure of the params: "
                + (f"no sharding for {missing[:4]}; " if missing else "")
                + (f"shardings for {extra[:4]}, which the params lack; " if extra else "")
                + (
                    f"first difference at `{dotted(names[first])}`"
                    if first is not None and not missing and not extra
                    else f"{len(got)} shardings for {len(names)} params"
                )
                + " (pass the shardings of the params before `pj.inject`)."
            )
        given = [v for _, v in pairs]
    out = []
    for (_, v), nm, g in zip(flat, names, given):
        where = dotted(nm) or "<root>"
        b = v.base if is_adapted(v) else v
        shape = tuple(getattr(b, "shape", ()))
        sh, entries = _resolve(g, shape, mesh, rules, where)
        if not is_adapted(v):
            out.append(sh)
            continue
        mesh_of = [sh.mesh] if isinstance(sh, NamedSharding) else []
        _check_rank_axis(rank_axis, mesh_of)
        arrays = (
            _adapter_shardings(v, entries, mesh_of[0], rank_axis, where)
            if entries is not None
            else _replicated_like(v, sh)
        )
        out.append(v.replace(base=sh, arrays=arrays))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------ concrete placement


def _concrete(x) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _put(x, sharding: Sharding):
    if not _concrete(x):
        return x
    if x.sharding == sharding or x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    return jax.device_put(x, sharding)


def put_like(x, ref):
    """``x`` on the sharding of ``ref`` when both are concrete arrays (a value that replaces
    ``ref``), else ``x``."""
    return _put(x, ref.sharding) if _concrete(ref) else x


def node_targets(node: Adapted, rank_axis=None, where: str = "") -> dict | None:
    """The shardings of ``node``'s adapter arrays by the rule, from its concrete base's
    sharding; ``None`` when the base is not a concrete array."""
    b = node.base
    if not _concrete(b):
        return None
    s = b.sharding
    if isinstance(s, NamedSharding):
        entries = _entries(s.spec, tuple(b.shape), s.mesh, where)
        return _adapter_shardings(node, entries, s.mesh, rank_axis, where)
    devs = s.device_set
    if len(devs) == 1:
        return _replicated_like(node, s)
    mesh = Mesh(np.array(sorted(devs, key=lambda d: d.id)), ("devices",))
    return _replicated_like(node, NamedSharding(mesh, PartitionSpec()))


def place_node(node: Adapted, where: str = "", base_sharding: Sharding | None = None) -> Adapted:
    """``node`` with its base on ``base_sharding`` (if given) and its adapter arrays where the
    rule says for the base's sharding (no copy for arrays already there)."""
    if base_sharding is not None and _concrete(node.base):
        node = node.replace(base=_put(node.base, base_sharding))
    targets = node_targets(node, where=where)
    if targets is None:
        return node
    return node.replace(arrays=_map_arrays(node, lambda n, k, v: _put(v, targets[n][k])))


def _explicit_sharding(x) -> NamedSharding | None:
    """The sharding a traced ``x`` carries in its type: under ``jax.jit`` only a mesh with
    Explicit axes puts it there (an Auto-axes tracer's spec is empty: pass ``out_shardings``)."""
    if not isinstance(x, jax.core.Tracer):
        return None
    try:
        s = jax.typeof(x).sharding
    except (AttributeError, TypeError):  # pragma: no cover - older JAX
        return None
    if not isinstance(s, NamedSharding) or not any(_names_of(e) for e in s.spec):
        return None
    return s


def _place_traced(node: Adapted, where: str) -> Adapted:
    s = _explicit_sharding(node.base)
    if s is None:
        return node
    entries = _entries(s.spec, tuple(node.base.shape), s.mesh, where)
    targets = _adapter_shardings(node, entries, s.mesh, None, where)
    reshard = lambda n, k, v: jax.sharding.reshard(v, targets[n][k])  # noqa: E731
    return node.replace(arrays=_map_arrays(node, reshard))


def place(params):
    """``params`` with every adapter array of a concrete, sharded (or committed) base weight
    moved where `shardings`' rule puts it (under ``jax.jit``: of a base whose traced type
    carries its sharding, i.e. on a mesh with Explicit axes); everything else as it was."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapted)
    if not any(is_adapted(v) for _, v in flat):
        return params
    vals = []
    for kp, v in flat:
        if is_adapted(v):
            where = dotted(keypath_to_names(kp))
            v = place_node(v, where) if _concrete(v.base) else _place_traced(v, where)
        vals.append(v)
    return jax.tree_util.tree_unflatten(treedef, vals)


def _with_sharding(x, sh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def abstract_like(out, given):
    """``out`` (abstract, from ``jax.eval_shape`` of `inject`) with the shardings the rule
    gives, when the abstract inputs ``given`` carried shardings (same flat order of bases)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(out, is_leaf=is_adapted)
    src = jax.tree_util.tree_leaves(given, is_leaf=is_adapted)
    if len(src) != len(flat):
        return out
    vals = []
    for (kp, v), g in zip(flat, src):
        gb = g.base if is_adapted(g) else g
        s = getattr(gb, "sharding", None)
        if not isinstance(s, Sharding):
            vals.append(v)
            continue
        if not is_adapted(v):
            vals.append(_with_sharding(v, s))
            continue
        where = dotted(keypath_to_names(kp))
        if isinstance(s, NamedSharding):
            entries = _entries(s.spec, tuple(gb.shape), s.mesh, where)
            tgt = _adapter_shardings(v, entries, s.mesh, None, where)
        else:
            tgt = _replicated_like(v, s)
        arrays = _map_arrays(v, lambda n, k, x, tgt=tgt: _with_sharding(x, tgt[n][k]))
        vals.append(v.replace(base=_with_sharding(v.base, s), arrays=arrays))
    return jax.tree_util.tree_unflatten(treedef, vals)
