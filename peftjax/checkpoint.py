"""Adapter-only Orbax checkpoints of a training run.

`AdapterCheckpointer` saves what a LoRA run changes (the trainable adapter arrays, the
optimizer state and the step) and never the base weights, so a checkpoint is adapter-sized.
To resume, inject the same config into freshly loaded base weights and `restore` into them.

Each step is an Orbax ``CheckpointManager`` step directory holding three items::

    <directory>/<step>/
      adapters/    Orbax standard pytree: {module path: {leaf: {adapter: {param: array}}}}
      opt_state/   Orbax standard pytree: the optimizer state's leaves, nested by key path
                   (absent when no optimizer state was saved, or it has no arrays)
      metadata/    JSON: format, peftjax version, step, adapter names, active names, every
                   adapter leaf's module / leaf / adapter / param / shape / dtype (and, for a
                   stacked adapter stored compact, the ``layers`` its arrays hold), the
                   optimizer state's leaves, and the user's ``extra``

Module paths are peftjax's (``layers.0.attn.q_proj``; a leading linen ``params`` collection is
dropped), so a checkpoint taken from ``{"params": tree}`` restores into ``tree`` and back. The
adapter item is a plain nested dict: Orbax never sees the `Adapted` node class or ``None``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ._tree import walk
from .errors import FormatError, MergeError, ShapeError
from .node import Adapted, is_adapted
from .training import partition

FORMAT = "peftjax.adapter_checkpoint"
FORMAT_VERSION = 1
_ADAPTERS, _OPT, _META = "adapters", "opt_state", "metadata"

Sharding = jax.sharding.Sharding


class CheckpointNotFoundError(FormatError, FileNotFoundError):
    """No checkpoint (or not the requested step) in the checkpoint directory.

    Raised by `AdapterCheckpointer.restore` and `AdapterCheckpointer.metadata` when the
    directory does not exist or holds no checkpoint (``step=None``), or when the asked ``step``
    is not among the saved ones. It is a `FormatError` and a ``FileNotFoundError``.

    Example:

      >>> import tempfile, peftjax as pj
      >>> with tempfile.TemporaryDirectory() as d:
      ...     pj.AdapterCheckpointer(d).metadata()
      Traceback (most recent call last):
      ...
      peftjax.checkpoint.CheckpointNotFoundError: checkpoint directory ... holds no checkpoint.
    """


# ------------------------------------------------------------------------------- key paths


def _seg(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _names(keypath) -> tuple[str, ...]:
    return tuple(_seg(e) for e in keypath)


def _nest(items: list[tuple[tuple[str, ...], Any]], what: str) -> dict:
    """``[(names, leaf)]`` -> nested dict; a path that is both a leaf and a prefix is an error."""
    out: dict = {}
    for names, leaf in items:
        d = out
        for k in names[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise FormatError(f"{what}: key path {'/'.join(names)} clashes with another leaf.")
        if names[-1] in d:
            raise FormatError(f"{what}: two leaves are both named {'/'.join(names)}.")
        d[names[-1]] = leaf
    return out


def _get(tree: Mapping, names: tuple[str, ...]):
    for k in names:
        tree = tree[k]
    return tree


def _abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype), sharding=sharding)


def _own_sharding(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, Sharding) else None


# --------------------------------------------------------------------------- adapter entries


def _layers_field(e: dict) -> dict:
    """``{"layers": [...]}`` for an array of a compact stacked adapter (`Spec.layers`), else
    ``{}`` (metadata of full-stack and unstacked adapters is as before)."""
    node = e["node"]
    spec = node.spec(e["adapter"]) if e["adapter"] in node.names else None
    layers = getattr(spec, "layers", None)
    return {} if layers is None else {"layers": [int(i) for i in layers]}


def _adapter_entries(params, arrays_of) -> list[dict]:
    """One entry per adapter array of every `Adapted` leaf of ``params``.

    ``arrays_of(node, leaf_of_params)`` gives ``{adapter: arrays | None}`` for that leaf. Each
    entry has ``module``, ``leaf``, ``adapter``, ``param`` (dotted), ``names`` (the array's full
    key path in ``params``), ``index`` (of the leaf), ``value`` and ``node``.
    """
    leaves, treedef = walk(params)
    paths = [
        _names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapted)[0]
    ]
    parts = arrays_of(treedef, leaves)
    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    out = []
    for l, path, part in zip(leaves, paths, parts, strict=True):
        if not is_adapted(l.value) or part is None:
            continue
        key = (l.module, l.name)
        if key in seen and seen[key] != path:
            raise FormatError(
                f"module `{l.module}` has two adapted `{l.name}` leaves ({'/'.join(seen[key])} "
                f"and {'/'.join(path)}); their checkpoint keys would clash."
            )
        seen[key] = path
        for name, arrays in part.items():
            if not arrays:
                continue
            for kp, value in jax.tree_util.tree_flatten_with_path(arrays)[0]:
                pnames = _names(kp)
                out.append(
                    dict(
                        module=l.module,
                        leaf=l.name,
                        adapter=name,
                        param=".".join(pnames),
                        names=(*path, "arrays", name, *pnames),
                        index=l.index,
                        value=value,
                        node=l.value,
                    )
                )
    return out


def _trainable_entries(params) -> list[dict]:
    trainable, _ = partition(params)

    def parts(treedef, leaves):
        return [t.arrays if is_adapted(t) else None for t in treedef.flatten_up_to(trainable)]

    return _adapter_entries(params, parts)


def _all_entries(params) -> list[dict]:
    return _adapter_entries(
        params, lambda _, leaves: [l.value.arrays if is_adapted(l.value) else None for l in leaves]
    )


def _key(e) -> tuple[str, str, str, str]:
    return e["module"], e["leaf"], e["adapter"], e["param"]


def _where(module: str, leaf: str) -> str:
    return f"module `{module or '<root>'}` ({leaf})"


# --------------------------------------------------------------------------------- checkpointer


class AdapterCheckpointer:
    """Adapter-only checkpoints of a training run, on top of ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: the run's checkpoint directory (created on the first save).
      max_to_keep: keep only the newest this many steps (``None``: keep all).
      save_interval_steps: `save` writes only steps that are a multiple of this (or ``force``).

    In a training loop::

        ckpt = pj.AdapterCheckpointer("/tmp/run", max_to_keep=3)
        trainable, frozen = pj.partition(params)
        opt_state = optimizer.init(trainable)
        ...
        ckpt.save(step, params, opt_state)
        # later, in a fresh process:
        params = pj.inject(load_base(), config, key=jax.random.key(0))
        opt_state = optimizer.init(pj.partition(params)[0])
        params, opt_state, step = ckpt.restore(params, opt_state)

    Saves are asynchronous (Orbax's default); `wait_until_finished` or `close` (or leaving the
    ``with`` block) waits for them.

    Example:

      >>> import tempfile, jax.numpy as jnp, peftjax as pj
      >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = pj.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False)
      >>> p = pj.inject(base, cfg, key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     with pj.AdapterCheckpointer(d) as ckpt:
      ...         started = ckpt.save(10, p)
      ...         ckpt.wait_until_finished()
      ...         q, _, step = ckpt.restore(pj.inject(base, cfg, key=1))
      ...         steps = ckpt.all_steps()
      >>> started, step, steps
      (True, 10, [10])
      >>> a = lambda t: t["fc"]["kernel"].arrays["default"]["lora_A"]
      >>> bool(jnp.array_equal(a(q), a(p)))
      True
    """

    def __init__(self, directory, *, max_to_keep: int | None = None, save_interval_steps: int = 1):
        self._directory = _absolute(directory)
        self._options = dict(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps)
        self._created = self._directory.is_dir()
        self._manager = self._make_manager(create=self._created)

    def _make_manager(self, create: bool) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(**self._options, create=create),
            item_handlers={
                _ADAPTERS: ocp.StandardCheckpointHandler(),
                _OPT: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def directory(self) -> epath.Path:
        """The checkpoint directory, as an absolute ``etils.epath.Path``."""
        return self._directory

    # ---- steps ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, params, opt_state=None, *, extra=None, force: bool = False) -> bool:
        """Save the trainable adapter arrays of ``params``, ``opt_state`` and ``step``.

        Only the active, unmerged adapters' arrays are stored (``pj.partition(params)[0]``);
        base weights never are.

        Args:
          step: the training step (a non-negative int).
          params: the full params tree with adapters injected.
          opt_state: the optimizer state (any pytree), or ``None``.
          extra: JSON-serialisable metadata to store alongside (see `metadata`).
          force: save even if ``step`` is not on the ``save_interval_steps`` grid.

        Returns:
          Whether a checkpoint was started (``False`` when the interval skipped this step).
        """
        step = int(step)
        entries = _trainable_entries(params)
        if not entries:
            raise FormatError(
                "`params`: no trainable adapter array to save (no adapter is injected, or none "
                "is active and unmerged); see `pj.set_active`."
            )
        # zero-size arrays (an AdaLoRA module pruned to rank 0, its optimizer moments) are
        # described in the metadata only: Orbax refuses to store them, and they hold no value
        adapters = _nest(
            [
                ((e["module"], e["leaf"], e["adapter"], e["param"]), e["value"])
                for e in entries
                if np.size(e["value"])
            ],
            "adapters",
        )
        opt_items = [
            (_names(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        ]
        stored_opt = [(n, x) for n, x in opt_items if np.size(x)]
        opt_tree = _nest(stored_opt, "`opt_state`") if stored_opt else None

        from . import __version__
        from .transforms import active, adapter_names

        meta = dict(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            peftjax_version=__version__,
            step=step,
            adapters=list(adapter_names(params)),
            active=list(active(params)),
            leaves=[
                dict(
                    module=e["module"],
                    leaf=e["leaf"],
                    adapter=e["adapter"],
                    param=e["param"],
                    shape=list(np.shape(e["value"])),
                    dtype=str(np.dtype(e["value"].dtype)),
                    # a stacked adapter stored compact: which layer slices its arrays hold
                    **_layers_field(e),
                )
                for e in entries
            ],
            opt_state=None
            if opt_state is None
            else [
                dict(key=list(n), shape=list(np.shape(x)), dtype=str(np.dtype(_dtype(x))))
                for n, x in opt_items
            ],
            extra=extra,
        )
        try:
            json.dumps(meta)
        except TypeError as err:
            raise TypeError(f"`extra` must be JSON-serialisable: {err}") from None

        items = {_META: ocp.args.JsonSave(meta)}
        if adapters:
            items[_ADAPTERS] = ocp.args.StandardSave(adapters)
        if opt_tree is not None:
            items[_OPT] = ocp.args.StandardSave(opt_tree)
        if not self._created:
            self._manager.close()
            self._manager = self._make_manager(create=True)
            self._created = True
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    # ---- restore ---------------------------------------------------------------------------
    def _step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        self._manager.reload()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                where = "does not exist" if not self._directory.is_dir() else "holds no checkpoint"
                raise CheckpointNotFoundError(f"checkpoint directory {self._directory} {where}.")
            return int(step)
        if int(step) not in self.all_steps():
            raise CheckpointNotFoundError(
                f"`step={step}`: no such checkpoint in {self._directory}; the saved steps are "
                f"{self.all_steps()}."
            )
        return int(step)

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the latest), with the user's ``extra``."""
        step = self._step(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise FormatError(
                f"{self._directory}/{step} is not a peftjax adapter checkpoint (no readable "
                f"`{_META}` item: {err})."
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FormatError(f"{self._directory}/{step} is not a peftjax adapter checkpoint.")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise FormatError(
                f"{self._directory}/{step} has format version {meta['format_version']}; this "
                f"peftjax reads up to {FORMAT_VERSION}. Upgrade peftjax."
            )
        return meta

    def restore(self, params, opt_state_like=None, *, step: int | None = None, sharding=None):
        """Restore a checkpoint's adapter arrays into ``params`` and its optimizer state.

        Args:
          params: the full params tree with the same adapters injected as when saving (for
            example freshly injected with any key); its adapter arrays are replaced. Arrays
            are restored with these arrays' dtypes and, unless ``sharding`` says otherwise,
            their shardings.
          opt_state_like: the optimizer state's structure, as concrete arrays (e.g.
            ``optimizer.init(pj.partition(params)[0])``) or ``jax.ShapeDtypeStruct``s (e.g.
            from ``jax.eval_shape``); ``None`` skips the optimizer state.
          step: the step to restore (default: the latest).
          sharding: where restored arrays go:
            a `jax.sharding.Sharding` for every array; or a pytree of shardings with the
            structure of ``params`` (or of ``pj.partition(params)[0]``) for the adapter arrays,
            which optimizer-state leaves mirroring an adapter array (same key-path suffix and
            shape, as optax's ``mu``/``nu``) follow; or a callable ``(name, abstract_array) ->
            Sharding | None`` called with each stored array's name in the checkpoint layout
            (``"adapters/<module>/<leaf>/<adapter>/<param>"``, ``"opt_state/<key>/..."``).
            Without an explicit sharding, an array keeps its target's sharding (the ``params``
            array, the ``opt_state_like`` leaf) if that is on the same devices as the rest, an
            optimizer-state leaf otherwise follows the adapter array it mirrors, and anything
            left is replicated on the adapters' devices.

        Returns:
          ``(params, opt_state, step)``: new params with the restored adapters (``params`` is
          left unchanged), the optimizer state (``None`` when ``opt_state_like`` is), the step.

        Raises:
          FormatError: the checkpoint has an adapter array ``params`` lacks (or the reverse),
            or its optimizer state does not match ``opt_state_like``.
          ShapeError: an adapter array's shape differs from the one in ``params``.
          CheckpointNotFoundError: no checkpoint (or not ``step``) in the directory.
        """
        step = self._step(step)
        meta = self.metadata(step)
        targets = self._adapter_targets(params, meta)
        by_name = _sharding_lookup(sharding, params)

        # abstract targets. Adapters: the explicit `sharding`, else the target array's own
        # sharding if it is on the same devices, else replicated on those devices.
        explicit = {
            key: by_name.adapter("adapters/" + "/".join(key), e) for key, e in targets.items()
        }
        chosen = {}
        for key, e in targets.items():
            sh = explicit[key]
            own = _own_sharding(e["value"])
            if sh is None and own is not None and _same_devices(own, explicit.values()):
                sh = own
            chosen[key] = sh
        devices = frozenset(d for sh in chosen.values() if sh is not None for d in sh.device_set)
        default = _replicated(chosen.values(), devices)
        suffix: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
        adapter_items = []
        empty: dict[tuple[str, ...], Any] = {}  # zero-size arrays: not stored, rebuilt
        for key, e in targets.items():
            sh = chosen[key] or default
            suffix[e["names"]] = (tuple(e["value"].shape), sh)
            if np.size(e["value"]):
                adapter_items.append((key, _abstract(e["value"], sh)))
            else:
                empty[key] = jax.device_put(jnp.zeros(e["value"].shape, _dtype(e["value"])), sh)
        items = {}
        if adapter_items:
            items[_ADAPTERS] = ocp.args.StandardRestore(_nest(adapter_items, "adapters"))

        opt_flat: list[tuple[Any, Any]] = []
        opt_def: Any = None
        if opt_state_like is not None:
            if meta.get("opt_state") is None:
                raise FormatError(
                    f"`opt_state_like` was given but the checkpoint at step {step} has no "
                    "optimizer state; pass `opt_state_like=None`."
                )
            opt_flat, opt_def = jax.tree_util.tree_flatten_with_path(opt_state_like)
            _check_opt(meta["opt_state"], opt_flat)
            opt_items = []
            for kp, x in opt_flat:
                names = _names(kp)
                abs_x = jax.ShapeDtypeStruct(tuple(np.shape(x)), np.dtype(_dtype(x)))
                if not np.size(x):
                    continue  # zero-size: not stored, rebuilt below
                # explicit `sharding`; else the leaf's own (if on the adapters' devices); else
                # the adapter array it mirrors (optax mu/nu); else replicated on those devices
                sh = by_name.opt("opt_state/" + "/".join(names), abs_x, names, suffix)
                own = _own_sharding(x)
                if sh is None and own is not None and _same_devices(own, chosen.values()):
                    sh = own
                sh = sh or _mirror(names, abs_x.shape, suffix) or default
                opt_items.append((names, _abstract(abs_x, sh)))
            if opt_items:
                items[_OPT] = ocp.args.StandardRestore(_nest(opt_items, "`opt_state_like`"))

        out = self._manager.restore(step, args=ocp.args.Composite(**items))

        leaves, treedef = walk(params)
        values = [l.value for l in leaves]
        updates: dict[int, dict[str, dict]] = {}
        for key, e in targets.items():
            value = empty[key] if key in empty else _get(out[_ADAPTERS], key)
            updates.setdefault(e["index"], {}).setdefault(e["adapter"], {})[e["param"]] = value
        for index, by_adapter in updates.items():
            node: Adapted = values[index]
            arrays = dict(node.arrays)
            for name, new in by_adapter.items():
                old = node.arrays[name]
                flat, adef = jax.tree_util.tree_flatten_with_path(old)
                arrays[name] = jax.tree_util.tree_unflatten(
                    adef, [new.get(".".join(_names(kp)), x) for kp, x in flat]
                )
            values[index] = node.replace(arrays=arrays)
        new_params = jax.tree_util.tree_unflatten(treedef, values)

        opt_state = None
        if opt_state_like is not None:
            restored: Any = out[_OPT] if _OPT in items else {}  # {}: no non-empty leaf
            opt_state = jax.tree_util.tree_unflatten(
                opt_def,
                [
                    _get(restored, _names(kp))
                    if np.size(x)
                    else jnp.zeros(np.shape(x), np.dtype(_dtype(x)))
                    for kp, x in opt_flat
                ],
            )
        return new_params, opt_state, step

    def _adapter_targets(self, params, meta) -> dict[tuple[str, ...], dict]:
        """Match the checkpoint's adapter leaves to ``params``; errors name the module."""
        have = {_key(e): e for e in _all_entries(params)}
        saved = {(d["module"], d["leaf"], d["adapter"], d["param"]): d for d in meta["leaves"]}
        if not have:
            raise FormatError(
                "`params` has no adapters; inject the adapter config used when saving (any key) "
                f"and restore into that. The checkpoint has adapters {meta['adapters']} on "
                f"modules {sorted({d['module'] for d in meta['leaves']})}."
            )
        modules = {(e["module"], e["leaf"]) for e in have.values()}
        out: dict[tuple[str, ...], dict] = {}
        for key, d in saved.items():
            module, leaf, name, param = key
            where = _where(module, leaf)
            e = have.get(key)
            if e is None:
                if (module, leaf) not in modules:
                    why = "`params` has no adapter there"
                elif not any(k[:3] == key[:3] for k in have):
                    why = f"`params` has no adapter {name!r} there"
                else:
                    why = f"adapter {name!r} there has no array {param!r}"
                raise FormatError(
                    f"{where}: the checkpoint has adapter {name!r} array {param!r} but {why}; "
                    "inject the same adapter config (and name) as when saving before restoring."
                )
            if tuple(e["value"].shape) != tuple(d["shape"]):
                raise ShapeError(
                    f"{where}: adapter {name!r} array {param!r} has shape {tuple(d['shape'])} "
                    f"in the checkpoint but {tuple(e['value'].shape)} in `params` (different "
                    "rank or base shape, or other `layers_to_transform` on a stacked weight: only "
                    "its transformed layer slices are stored?)."
                )
            mine, theirs = _layers_field(e).get("layers"), d.get("layers")
            if mine != theirs:
                raise ShapeError(
                    f"{where}: adapter {name!r} array {param!r} holds the stacked layer slices "
                    f"{theirs if theirs is not None else 'all'} in the checkpoint but "
                    f"{mine if mine is not None else 'all'} in `params`; inject the same "
                    "`layers_to_transform` as when saving before restoring."
                )
            if name in e["node"].merged:
                raise MergeError(
                    f"{where}: adapter {name!r} is merged into the base weight; `pj.unmerge` "
                    "before restoring its arrays."
                )
            out[key] = e
        names = {k[2] for k in saved}
        for key, e in have.items():
            node = e["node"]
            spec = node.spec(key[2]) if key[2] in node.names else None
            if spec is not None and key[3].split(".")[0] in spec.frozen_arrays:
                continue  # never trained, never saved (VeRA's projections): the target's stay
            if key[2] in names and key not in saved and key[2] not in node.merged:
                raise FormatError(
                    f"{_where(key[0], key[1])}: `params` has adapter {key[2]!r} array "
                    f"{key[3]!r} that the checkpoint lacks (different `target_modules`?)."
                )
        return out


# ------------------------------------------------------------------------------------- helpers


def _absolute(directory) -> epath.Path:
    """The checkpoint directory as an absolute path: Orbax needs one, and a relative path is
    taken relative to the current directory at construction (``runs/ckpt`` works as written)."""
    text = os.fspath(directory) if not isinstance(directory, epath.Path) else str(directory)
    if "://" in text:  # gs://, s3://, ...: already absolute
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _dtype(x):
    return getattr(x, "dtype", None) or np.asarray(x).dtype


def _check_opt(saved: list[dict], flat) -> None:
    want = {tuple(d["key"]): (tuple(d["shape"]), d["dtype"]) for d in saved}
    got = {_names(kp): tuple(np.shape(x)) for kp, x in flat}
    missing = [k for k in got if k not in want]
    extra = [k for k in want if k not in got]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"not in the checkpoint: {['/'.join(k) for k in missing[:4]]}")
        if extra:
            parts.append(f"only in the checkpoint: {['/'.join(k) for k in extra[:4]]}")
        raise FormatError(
            "`opt_state_like` does not match the checkpoint's optimizer state ("
            + "; ".join(parts)
            + "); build it with the same optimizer on `pj.partition(params)[0]`."
        )
    for k, shape in got.items():
        if shape != want[k][0]:
            raise ShapeError(
                f"`opt_state_like` leaf {'/'.join(k)} has shape {shape} but {want[k][0]} in "
                "the checkpoint."
            )


def _mirror(names, shape, suffix):
    """The sharding of the adapter array whose key path ends ``names`` (optax ``mu``/``nu``)."""
    for i in range(len(names)):
        hit = suffix.get(tuple(names[i:]))
        if hit is not None and hit[0] == tuple(shape):
            return hit[1]
    return None


def _same_devices(sharding: Sharding, others) -> bool:
    """Whether ``sharding`` is on the devices of the (non-None) ``others``, if there are any."""
    devices = {d for sh in others if sh is not None for d in sh.device_set}
    return not devices or sharding.device_set == devices


def _replicated(shardings, devices) -> Sharding:
    """A fully replicated sharding on ``devices`` (the local first device when empty)."""
    if not devices:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for sh in shardings:
        if isinstance(sh, jax.sharding.NamedSharding) and sh.device_set == devices:
            return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    if len(devices) == 1:
        return jax.sharding.SingleDeviceSharding(next(iter(devices)))
    mesh = jax.sharding.Mesh(np.array(sorted(devices, key=lambda d: d.id)), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class _Lookup:
    def __init__(self, adapter=None, opt=None):
        self._adapter = adapter
        self._opt = opt

    def adapter(self, name, e):
        return self._adapter(name, e) if self._adapter else None

    def opt(self, name, abs_x, names, suffix):
        return self._opt(name, abs_x, names, suffix) if self._opt else None


def _sharding_lookup(sharding, params) -> _Lookup:
    if sharding is None:
        return _Lookup()
    if isinstance(sharding, Sharding):
        return _Lookup(lambda n, e: sharding, lambda n, a, names, suffix: sharding)
    if callable(sharding) and not isinstance(sharding, (Mapping, Adapted)):

        def call(name, abs_x):
            sh = sharding(name, abs_x)
            if sh is not None and not isinstance(sh, Sharding):
                raise TypeError(
                    f"`sharding` returned {type(sh).__name__} for {name}; expected a "
                    "jax.sharding.Sharding or None."
                )
            return sh

        return _Lookup(
            lambda n, e: call(n, _abstract(e["value"])),
            lambda n, a, names, suffix: call(n, a),
        )
    # a pytree of shardings shaped like params (or its trainable part)
    tree = partition(sharding)[0]
    leaves, treedef = walk(params)
    try:
        parts = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise FormatError(
            f"`sharding`: the pytree does not have the structure of `params`: {err}"
        ) from None
    table: dict[tuple[int, str, str], Any] = {}
    for l, part in zip(leaves, parts, strict=True):
        if is_adapted(l.value) and is_adapted(part):
            for name, arrays in part.arrays.items():
                for kp, sh in jax.tree_util.tree_flatten_with_path(arrays or {})[0]:
                    table[(l.index, name, ".".join(_names(kp)))] = sh
    return _Lookup(
        lambda n, e: table.get((e["index"], e["adapter"], e["param"])),
        lambda n, a, names, suffix: _mirror(names, a.shape, suffix),
    )
