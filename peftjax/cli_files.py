"""``peftjax inspect`` and ``peftjax merge``: HF PEFT adapters against HF safetensors checkpoints.

``merge`` streams a (possibly sharded) torch-layout checkpoint shard by shard: each shard's
adapted weights are turned into a small Flax-layout tree, the adapter is loaded into it with
`load_pretrained` and folded with `merge_and_unload` (the library's jitted float32 kernels, one
cast back to the checkpoint dtype), and the shard is written back with the same keys, dtypes
and index. Peak memory is about one shard plus the adapter.

Embedding base weights: after a vocabulary resize, PEFT saves a targeted embedding's (or
``lm_head``'s) full weight as ``base_model.model.<module>.base_layer.weight``. ``merge`` folds the
LoRA delta into that weight instead of the checkpoint's; the output tensor takes its shape (the
index's ``metadata.total_size`` and ``config.json``'s ``vocab_size`` follow).

File rules (the same as the loaders', `peftjax._fs`):

* Every file ``merge`` reads (the index, each shard, each side file such as ``config.json`` or
  the tokenizer's) must be a regular file. A symlink is followed only when it resolves inside
  ``--base`` or, for an HF hub cache snapshot, into that repository's ``blobs/``. Any other link,
  and any FIFO, device or socket, is refused with an error naming it, before anything is
  written: the merge aborts rather than skip or copy a file it may not read. Directories are not
  copied; pickle files (``.bin``, ``.pt``, ...) are never read.
* Shard names in ``model.safetensors.index.json`` must be plain file names (no directories,
  ``..`` or absolute paths), so every shard is read from ``--base`` and written to ``--out``.
* ``--out`` must be a new or empty directory, not a symlink, not ``--base`` and not inside it.
* Output appears only when complete: everything is written to a sibling
  ``.<out>.partial-XXXXXXXX`` directory renamed to ``--out`` at the end, while an exclusive lock
  on ``.<out>.lock`` is held; partial directories left by a killed merge to the same ``--out``
  are removed by the next one (under the same lock, so concurrent merges never remove each
  other's work: the second one is refused while the first holds the lock).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import _fs
from .errors import FormatError, MergeError

try:  # POSIX; without it (Windows) merges to one --out are not guarded against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PARTIAL = ".partial-"
_COPY_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------ inputs


def _check_out(out: Path, base: Path) -> None:
    """Refuse an unusable ``--out`` before any work: a symlink (dangling or not), a file, a
    non-empty directory, ``--base`` itself or a path inside it."""
    real_out, real_base = Path(os.path.realpath(out)), Path(os.path.realpath(base))
    if real_out == real_base or real_base in real_out.parents:
        raise FormatError(
            f"`--out {out}` is `--base {base}` or inside it; write the merged checkpoint elsewhere."
        )
    if os.path.islink(out):
        state = "a dangling symlink" if not os.path.exists(out) else "a symlink"
        raise FormatError(
            f"`--out {out}` is {state}; give the path of a new (or empty) directory, not a link."
        )
    if os.path.lexists(out):
        if not out.is_dir():
            raise FormatError(f"`--out {out}` exists and is not a directory; choose a new one.")
        try:
            with os.scandir(out) as it:
                nonempty = any(True for _ in it)
        except OSError as e:
            raise FormatError(f"`--out {out}`: cannot list it: {e.strerror or e}.") from None
        if nonempty:
            raise FormatError(f"`--out {out}` exists and is not empty; choose a new directory.")


def _json_file(path: Path, what: str, roots) -> tuple[bytes, object]:
    raw = _fs.read_regular_file(path, what, roots=roots, max_bytes=_fs.MAX_JSON_BYTES)
    try:
        return raw, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{what}: `{path}` is not valid JSON ({e}).") from None


def _shards(base: Path, roots) -> tuple[list[str], bytes | None, dict | None]:
    """``(shard file names, index bytes, index)``; every shard checked to be a regular file
    inside ``--base`` (see the module's file rules) before any of it is read."""
    if not base.is_dir():
        raise FormatError(f"`--base {base}`: no such directory.")
    index = base / INDEX_NAME
    if os.path.lexists(index):
        raw, data = _json_file(index, "checkpoint index", roots)
        if not isinstance(data, dict):
            raise FormatError(f"`{index}`: not a safetensors index (not a JSON object).")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise FormatError(
                f"`{index}`: `weight_map` must be a non-empty object mapping tensor names to "
                f"shard file names, got {type(wm).__name__} {str(wm)[:80]}."
            )
        for key, name in wm.items():
            what = f"`{index}`: weight_map[{key!r}]"
            parts = re.split(r"[/\\]", name) if isinstance(name, str) else []
            if len(parts) > 1 and not os.path.isabs(name) and all(parts) and ".." not in parts:
                raise FormatError(
                    f"{what} = {name!r} puts a shard in a subfolder; shards must be plain file "
                    "names next to the index."
                )
            _fs.check_plain_name(name, what)
        files = sorted(set(wm.values()))
        for f in files:
            _fs.check_regular_file(base / f, f"shard `{f}` named by `{index}`", roots=roots)
        return files, raw, data
    if os.path.lexists(base / SINGLE_NAME):
        _fs.check_regular_file(base / SINGLE_NAME, "checkpoint", roots=roots)
        return [SINGLE_NAME], None, None
    pickles = [p.name for p in base.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise FormatError(
            f"`{base}` holds only pickle checkpoints ({', '.join(sorted(pickles))}); peftjax never "
            "loads pickle files. Convert the checkpoint to safetensors first."
        )
    raise FormatError(f"`{base}` has no {SINGLE_NAME} or {INDEX_NAME}.")


def _side_files(base: Path, roots, skip: set[str]) -> list[tuple[Path, os.stat_result]]:
    """The files of ``--base`` copied to ``--out`` as they are (config, tokenizer, ...), each
    checked by the file rules: a link out of ``--base`` or a special file aborts the merge."""
    out = []
    for name in sorted(os.listdir(base)):
        p = base / name
        if name in skip or p.suffix in PICKLE_SUFFIXES:
            continue
        lst = os.lstat(p)
        if stat.S_ISDIR(lst.st_mode) or (stat.S_ISLNK(lst.st_mode) and p.is_dir()):
            continue  # folders (and links to them) are not copied: nothing of them is read
        out.append((p, _fs.check_regular_file(p, f"side file `{name}` of `--base`", roots=roots)))
    return out


def _copy_file(src: Path, st: os.stat_result, dst: Path) -> None:
    """Copy the regular file ``src`` (``st`` from `_fs.check_regular_file`) as a new regular file;
    refused if it was swapped for another file or a special one after the check."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(src, flags)
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode) or not os.path.samestat(fst, st):
            raise FormatError(f"side file `{src}` changed while being copied; refusing it.")
        with open(dst, "xb") as g:
            left = fst.st_size
            while left > 0:
                chunk = f.read(min(_COPY_CHUNK, left))
                if not chunk:
                    break
                g.write(chunk)
                left -= len(chunk)
            g.flush()
            os.fsync(g.fileno())
    os.chmod(dst, stat.S_IMODE(fst.st_mode))
    os.utime(dst, ns=(fst.st_atime_ns, fst.st_mtime_ns))


# ------------------------------------------------------------------------------------ --out


@contextlib.contextmanager
def _out_lock(out: Path):
    """Hold an exclusive ``flock`` on ``.<out>.lock`` (next to ``--out``) for the whole merge;
    refuse at once if another merge holds it. The lock file is removed on release (checked by
    inode, so a removed-and-recreated lock file is never mistaken for the one held)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FormatError(
                f"`--out {out}`: another peftjax merge is writing it (`{path}` is locked); wait "
                "for it to finish or choose another directory."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the merge that held it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _partial_re(out: Path) -> re.Pattern:
    # tempfile.mkdtemp's names: prefix + 8 characters of [a-z0-9_]
    return re.compile(re.escape(f".{out.name}{_PARTIAL}") + r"[a-z0-9_]{8}")


def _remove_stale_partials(out: Path) -> list[str]:
    """Remove ``.<out>.partial-XXXXXXXX`` directories a killed merge left (call with the lock
    held). Only real directories with exactly peftjax's name pattern are touched."""
    pat, removed = _partial_re(out), []
    for name in os.listdir(out.parent):
        p = out.parent / name
        if pat.fullmatch(name) and stat.S_ISDIR(os.lstat(p).st_mode):
            shutil.rmtree(p)
            removed.append(name)
    return removed


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------ merge


def _checkpoint_leaf(kind: str, torch_ndim: int):
    """The Flax leaf name of a checkpoint weight being merged into, and io's torch<->Flax rule."""
    from . import _torch_layout as L

    if kind == "embed":
        return "embedding", L.SAME
    if torch_ndim == 2:
        return "kernel", L.TRANSPOSE
    if torch_ndim in (3, 4, 5):
        return "kernel", L.CONV
    raise FormatError(f"cannot merge into a weight with {torch_ndim} dims.")


def _set(tree: dict, path: str, value) -> None:
    node = tree
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _get(tree: dict, path: str):
    node = tree
    for p in path.split("."):
        node = node[p]
    return node


def _too_many(items: list) -> str:
    return f"{items[:10]}" + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")


def merge_checkpoint(
    base_dir, adapter_dir, out_dir, *, name: str = "default", safe: bool = False, progress=True
) -> dict:
    """Merge an HF PEFT adapter into an HF safetensors checkpoint, shard by shard.

    Every input is checked (see the module's file rules) before anything is written; the
    output directory appears complete or not at all. Returns a dict with the number of shards,
    merged modules, replaced tensors and removed stale partial directories.
    """
    import jax

    from . import io
    from .methods import method_of

    base, out = Path(base_dir), Path(os.path.abspath(out_dir))
    _check_out(out, base)
    roots = _fs.allowed_roots(base)
    files, index_raw, index = _shards(base, roots)
    side = _side_files(base, roots, set(files) | {INDEX_NAME})
    cfg, tensors = io.read_adapter(adapter_dir, name)
    pt = cfg.peft_type
    method = method_of(cfg)
    if cfg.route is not None:
        raise MergeError(
            f"`{adapter_dir}` is a {method.name} adapter ({pt}): it acts on the model's "
            "activations (virtual tokens, attention keys and values), not on its weights, so "
            "there is nothing to merge into a checkpoint (PEFT cannot merge it either); load it "
            "with `pj.load_pretrained` and run it through `pj.apply` / `pj.prompt_inputs`."
        )
    kinds: dict[str, str] = {}
    replace: dict[str, np.ndarray] = {}
    for k in tensors:
        if k in method.shared_keys:  # adapter-wide (VeRA's projections): loaded, not a module
            continue
        kind, mod, suffix = io.file_key(k, method)
        if kind == "adapter":
            kinds[mod] = "embed" if suffix in method.embed_suffixes else kinds.get(mod, "linear")
        elif kind in ("copy", "whole"):
            replace[f"{mod}.{suffix}"] = tensors[k]
    # checkpoint key -> the adapter's base-layer tensor that replaces it (may be resized)
    base_w = {ck: tensors[ak] for ck, ak in io.embedding_base_keys(tensors, pt).items()}
    # One adapter load over every adapted module, with abstract base weights read from the
    # shard headers; each module is then merged on its own, so the transient memory is one
    # shard (read-only views of its bytes) plus one module's float32 copies.
    where: dict[str, str] = {}
    headers: dict[str, dict] = {}
    abstract: dict = {}
    for fname in files:
        headers[fname] = io.read_safetensors_header(base / fname)
        for key, (shape, dtype) in headers[fname].items():
            if key in base_w:
                shape = tuple(base_w[key].shape)
            mod, _, param = key.rpartition(".")
            if mod in kinds and param in ("weight", "bias"):
                where.setdefault(mod, fname)
                if param == "weight":
                    leaf, rule = _checkpoint_leaf(kinds[mod], len(shape))
                    sds = jax.ShapeDtypeStruct(rule.flax_shape(shape), dtype)
                    _set(abstract, f"{mod}.{leaf}", sds)
                elif pt == "IA3":
                    _set(abstract, f"{mod}.bias", jax.ShapeDtypeStruct(tuple(shape), dtype))
    missing = sorted(set(kinds) - set(where))
    if missing:
        raise FormatError(f"the adapter targets modules the checkpoint lacks: {_too_many(missing)}")
    in_ckpt = {k for h in headers.values() for k in h}
    missing = sorted(set(base_w) - in_ckpt)
    if missing:
        raise FormatError(
            f"the adapter carries base-layer weights for tensors the checkpoint lacks: "
            f"{_too_many(missing)}"
        )
    for key, value in base_w.items():
        ndim = len(next(h[key][0] for h in headers.values() if key in h))
        if value.ndim != ndim:
            raise FormatError(
                f"`{key}`: the adapter's base-layer weight has shape {list(value.shape)}, the "
                f"checkpoint's has {ndim} dims."
            )
    adapted = io.load_pretrained(abstract, adapter_dir, name, strict=False) if kinds else {}
    resized = {
        k: (h[k][0], tuple(v.shape), h[k][1])
        for k, v in base_w.items()
        for h in headers.values()
        if k in h and tuple(h[k][0]) != tuple(v.shape)
    }
    index_out = _index_bytes(index_raw, index, headers, resized)

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _out_lock(out):
        stale = _remove_stale_partials(out)
        _check_out(out, base)  # again, under the lock: another merge may have finished it
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would be --out's mode
        done_mods: set[str] = set()
        done_repl: set[str] = set()
        bar = _ShardBar(len(files)) if progress else None
        try:
            for fname in files:
                mods = {m for m, f in where.items() if f == fname}
                _merge_shard(
                    base / fname,
                    tmp / fname,
                    adapted,
                    mods,
                    kinds,
                    replace,
                    base_w,
                    safe,
                    done_repl,
                )
                done_mods |= mods
                gc.collect()  # free this shard before reading the next one
                if bar is not None:
                    bar.advance()
            missing = sorted(set(replace) - done_repl)
            if missing:
                raise FormatError(
                    f"the adapter targets modules the checkpoint lacks: {_too_many(missing)}"
                )
            if index_out is not None:
                with open(tmp / INDEX_NAME, "xb") as f:
                    f.write(index_out)
                    f.flush()
                    os.fsync(f.fileno())
            for p, st in side:  # config, tokenizer, ...
                new_cfg = _resized_config(p, resized, roots) if p.name == CONFIG_NAME else None
                if new_cfg is None:
                    _copy_file(p, st, tmp / p.name)
                else:
                    (tmp / p.name).write_bytes(new_cfg)
            _fsync_dir(tmp)
            os.replace(tmp, out)  # onto a missing or empty --out: atomic
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bar is not None:
                bar.stop(failed=sys.exc_info()[0] is not None)
    return {
        "shards": len(files),
        "modules": len(done_mods),
        "replaced": len(done_repl),
        "resized": sorted(resized),
        "stale_removed": stale,
    }


def _index_bytes(raw: bytes | None, index: dict | None, headers: dict, resized: dict):
    """The output index: the input's bytes, or with ``metadata.total_size`` recomputed when the
    adapter's base-layer weights change tensor sizes."""
    if raw is None or index is None:
        return raw
    meta = index.get("metadata")
    if not resized or not isinstance(meta, dict) or "total_size" not in meta:
        return raw
    total = 0
    for h in headers.values():
        for key, (shape, dtype) in h.items():
            shape = resized[key][1] if key in resized else shape
            total += math.prod(shape) * np.dtype(dtype).itemsize
    new = dict(index, metadata={**meta, "total_size": total})
    return (json.dumps(new, indent=2) + "\n").encode()


def _resized_config(path: Path, resized: dict, roots) -> bytes | None:
    """``config.json`` with ``vocab_size`` set to the resized vocabulary, or None to copy it."""
    if not resized:
        return None
    try:
        _, cfg = _json_file(path, f"`{CONFIG_NAME}` of `--base`", roots)
    except FormatError:
        return None  # not ours to judge: copied as it is
    if not isinstance(cfg, dict):
        return None
    vocab = cfg.get("vocab_size")
    if not isinstance(vocab, int):
        return None
    new = {new[0] for old, new, _ in resized.values() if len(old) == 2 and old[0] == vocab}
    if len(new) != 1:
        return None
    return (json.dumps({**cfg, "vocab_size": new.pop()}, indent=2, sort_keys=True) + "\n").encode()


def _merge_shard(src, dst, adapted, mods, kinds, replace, base_w, safe, done_repl: set) -> None:
    """Write shard ``src`` to ``dst``, merging the adapted modules ``mods`` one at a time just
    before their tensors are written (at most one module's merged tensors held at once)."""
    import jax.numpy as jnp

    from . import io

    shard, meta = io.read_safetensors(src)
    todo = set(mods)
    pending: dict[str, np.ndarray] = {}

    def produce(key: str) -> np.ndarray:
        if key in pending:
            return pending.pop(key)
        mod, _, param = key.rpartition(".")
        if mod in todo and param in ("weight", "bias"):
            todo.discard(mod)
            pending.update(_merge_module(adapted, mod, kinds[mod], shard, base_w, safe, src))
            if key in pending:  # else a bias the method leaves alone (LoRA), written below
                return pending.pop(key)
        if key in base_w:  # a base-layer weight of a module the adapter does not change
            return np.asarray(jnp.asarray(base_w[key]).astype(shard[key].dtype))
        if key in replace:
            value = replace[key]
            if tuple(shard[key].shape) != tuple(value.shape):
                raise FormatError(
                    f"`{key}`: the adapter's copy has shape {tuple(value.shape)}, the "
                    f"checkpoint's {tuple(shard[key].shape)}."
                )
            done_repl.add(key)
            return np.asarray(jnp.asarray(value).astype(shard[key].dtype))
        return shard[key]

    specs = {
        k: (tuple(base_w[k].shape) if k in base_w else v.shape, v.dtype) for k, v in shard.items()
    }
    io.write_safetensors_streaming(dst, specs, produce, meta or {"format": "pt"})


def _merge_module(
    adapted, mod: str, kind: str, shard, base_w, safe: bool, src
) -> dict[str, np.ndarray]:
    """Merged torch-layout tensors (``weight``, and ``bias`` under IA3) of one module. The base
    is the checkpoint's tensor or, where the adapter carries one, its base-layer weight."""
    import jax.numpy as jnp

    from .transforms import merge_and_unload

    def base_of(key: str):
        return base_w[key] if key in base_w else shard[key]

    group = dict(_get(adapted, mod))
    wkey = f"{mod}.weight"
    dtype = shard[wkey].dtype
    w_t = base_of(wkey)
    leaf, rule = _checkpoint_leaf(kind, w_t.ndim)
    w = rule.from_torch(np.asarray(w_t), rule.flax_shape(tuple(w_t.shape)))
    group[leaf] = group[leaf].replace(base=jnp.asarray(w).astype(dtype))
    if "bias" in group:
        b = jnp.asarray(base_of(f"{mod}.bias")).astype(shard[f"{mod}.bias"].dtype)
        group["bias"] = group["bias"].replace(base=b)
    tree: dict = {}
    _set(tree, mod, group)  # under its real path, so that errors name the module
    holders = _shared_holders(group, mod)
    for holder in holders:
        _set(tree, holder, _as_holder_only(_get(adapted, holder)))
    try:
        with warnings.catch_warnings():
            if holders:  # the holders are marked merged on purpose: not PEFT's warning case
                warnings.filterwarnings("ignore", "All adapters are already merged")
            merged = _get(merge_and_unload(tree, safe=safe), mod)
    except MergeError as e:
        raise MergeError(f"`{wkey}` in `{src}`: {e}") from None
    out = {wkey: rule.to_torch(np.asarray(merged[leaf]))}
    if "bias" in merged:
        out[f"{mod}.bias"] = np.asarray(merged["bias"])
    return out


def _shared_holders(group: dict, mod: str) -> set[str]:
    """The other modules whose leaves hold adapter-wide arrays the module's adapters use
    (`Spec.shared_holder`: VeRA's projections)."""
    from .node import is_adapted

    out = set()
    for node in group.values():
        if is_adapted(node):
            out |= {s.shared_holder() for _, s in node.specs if s.shared_holder() is not None}
    return out - {mod}


def _as_holder_only(group: dict) -> dict:
    """A holder module's adapted leaves as carriers of their shared arrays only: marked merged
    (so `merge_and_unload` folds nothing into them) on a placeholder base (theirs is in another
    shard, or abstract)."""
    from .node import is_adapted

    return {
        k: v.replace(base=np.zeros((), np.float32), merged=v.names)
        for k, v in group.items()
        if is_adapted(v)
    }


class _ShardBar:
    """``merge``'s progress over the shards: a `rich.progress` bar on the current `sys.stderr`
    (off a terminal, rich prints it once, when it stops)."""

    def __init__(self, n: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress(
            "shard",
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
        )
        self.task = self.progress.add_task("merge", total=n)
        self.progress.start()

    def advance(self) -> None:
        self.progress.advance(self.task)

    def stop(self, failed: bool = False) -> None:
        """Stop the bar; after an error it vanishes (the error is the one line printed)."""
        if failed:
            self.progress.live.transient = True
        self.progress.stop()


# ------------------------------------------------------------------------------------ commands


def _inspect(args) -> int:
    from .io import inspect_adapter

    info = inspect_adapter(args.adapter, args.name)
    embeddings = list(info.get("embedding_layers", []))
    saved = [m for m in info["modules_to_save"] if m not in embeddings]
    ranks = sorted(set(info["ranks"].values()))
    print(f"adapter:        {info['path']}")
    print(f"method:         {info['method']} (peft_type {info['peft_type']})")
    print(f"targets:        {len(info['targets'])} modules")
    for t in info["targets"]:
        r = info["ranks"].get(t)
        print(f"  {t}" + (f"  r={r}" if r is not None else ""))
    if embeddings:
        print(f"embedding layers: {', '.join(embeddings)} (base weights saved in the adapter)")
    if saved:
        print(f"modules_to_save: {', '.join(saved)}")
    if ranks:
        print(f"ranks:          {', '.join(map(str, ranks))}")
    print(f"parameters:     {info['n_params']:,d} in {info['n_tensors']} tensors")
    print(f"dtype:          {info['dtype']}")
    print(f"file size:      {info['file_size']:,d} bytes")
    return 0


def _merge(args) -> int:
    res = merge_checkpoint(args.base, args.adapter, args.out, name=args.name, safe=args.safe)
    if res["stale_removed"]:
        print(f"removed {len(res['stale_removed'])} partial director(ies) of an interrupted merge")
    resized = f", {len(res['resized'])} resized" if res["resized"] else ""
    print(
        f"merged {res['modules']} modules ({res['replaced']} replaced tensors{resized}) over "
        f"{res['shards']} shard(s) into {args.out}"
    )
    return 0


def add_file_commands(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="summarise an HF PEFT adapter directory",
        description="Summarise an HF PEFT adapter directory: method, targets, ranks, parameters, "
        "dtype and file size.",
    )
    i.add_argument("adapter", help="HF PEFT adapter directory (adapter_config.json + weights)")
    i.add_argument(
        "--name", default="default", help="adapter name, for a PEFT <dir>/<name>/ layout"
    )
    i.set_defaults(func=_inspect)
    m = sub.add_parser(
        "merge",
        help="merge an HF PEFT adapter into an HF safetensors checkpoint",
        description="Merge an HF PEFT adapter into an HF safetensors checkpoint (sharded or not), "
        "shard by shard. Reads only regular files inside --base (links may lead into an HF hub "
        "cache's blobs/); --out must be a new or empty directory outside --base and appears "
        "only when complete.",
    )
    m.add_argument("--base", required=True, help="HF checkpoint directory (safetensors)")
    m.add_argument("--adapter", required=True, help="HF PEFT adapter directory")
    m.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    m.add_argument(
        "--name", default="default", help="adapter name, for a PEFT <dir>/<name>/ layout"
    )
    m.add_argument("--safe", action="store_true", help="refuse non-finite merged weights")
    m.set_defaults(func=_merge)
