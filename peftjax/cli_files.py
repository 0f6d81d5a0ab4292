"""``peftjax inspect`` and ``peftjax merge``: HF PEFT adapters against HF safetensors checkpoints.

``merge`` streams a (possibly sharded) torch-layout checkpoint shard by shard: each shard's
adapted weights are turned into a small Flax-layout tree, the adapter is loaded into it with
`load_pretrained` and folded with `merge_and_unload` (the library's jitted float32 kernels, one
cast back to the checkpoint dtype), and the shard is written back with the same keys, dtypes
and index. Peak memory is about one shard plus the adapter. Output appears only when complete:
everything is written to a temporary sibling directory that is renamed at the end.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import FormatError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _shards(base: Path) -> tuple[list[str], dict | None]:
    if not base.is_dir():
        raise FormatError(f"`--base {base}`: no such directory.")
    index = base / INDEX_NAME
    if index.exists():
        try:
            data = json.loads(index.read_text())
            files = sorted(set(data["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"`{index}`: not a safetensors index ({e}).") from None
        missing = [f for f in files if not (base / f).exists()]
        if missing:
            raise FormatError(f"`{index}` names shards that do not exist: {missing}.")
        return files, data
    if (base / SINGLE_NAME).exists():
        return [SINGLE_NAME], None
    pickles = [p.name for p in base.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise FormatError(
            f"`{base}` holds only pickle checkpoints ({', '.join(sorted(pickles))}); peftjax never "
            "loads pickle files. Convert the checkpoint to safetensors first."
        )
    raise FormatError(f"`{base}` has no {SINGLE_NAME} or {INDEX_NAME}.")


def _weight_leaf(kind: str, torch_ndim: int):
    """The Flax leaf name of a checkpoint weight being merged into, and io's torch<->Flax rule."""
    from .io import _Rule

    if kind == "embed":
        return "embedding", _Rule("id")
    if torch_ndim == 2:
        return "kernel", _Rule("T")
    if torch_ndim in (3, 4, 5):
        return "kernel", _Rule("conv")
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


def merge_checkpoint(
    base_dir, adapter_dir, out_dir, *, name: str = "default", safe: bool = False, progress=True
) -> dict:
    """Merge an HF PEFT adapter into an HF safetensors checkpoint, shard by shard.

    Returns a dict with the number of shards, merged modules and replaced tensors.
    """
    import jax

    from . import io

    base, out = Path(base_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"`--out {out}` exists and is not empty; choose a new directory.")
    cfg, tensors = io.read_adapter(adapter_dir, name)
    pt = cfg.peft_type
    kinds: dict[str, str] = {}
    replace: dict[str, np.ndarray] = {}
    for k in tensors:
        kind, mod, suffix = io._split_key(k, pt)
        if kind == "adapter":
            kinds[mod] = (
                "embed" if suffix.startswith("lora_embedding") else kinds.get(mod, "linear")
            )
        elif kind in ("copy", "ln"):
            replace[f"{mod}.{suffix}"] = tensors[k]
    files, index = _shards(base)
    # One adapter load over every adapted module, with abstract base weights read from the
    # shard headers; each module is then merged on its own, so the transient memory is one
    # shard (read-only views of its bytes) plus one module's float32 copies.
    where: dict[str, str] = {}
    abstract: dict = {}
    for fname in files:
        for key, (shape, dtype) in io.read_safetensors_header(base / fname).items():
            mod, _, param = key.rpartition(".")
            if mod in kinds and param in ("weight", "bias"):
                where.setdefault(mod, fname)
                if param == "weight":
                    leaf, rule = _weight_leaf(kinds[mod], len(shape))
                    sds = jax.ShapeDtypeStruct(rule.flax_shape(shape), dtype)
                    _set(abstract, f"{mod}.{leaf}", sds)
                elif pt == "IA3":
                    _set(abstract, f"{mod}.bias", jax.ShapeDtypeStruct(tuple(shape), dtype))
    missing = sorted(set(kinds) - set(where))
    if missing:
        raise FormatError(
            f"the adapter targets modules the checkpoint lacks: {missing[:10]}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    adapted = io.load_pretrained(abstract, adapter_dir, name, strict=False) if kinds else {}
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    done_mods: set[str] = set()
    done_repl: set[str] = set()
    t0 = time.perf_counter()
    try:
        for i, fname in enumerate(files, 1):
            mods = {m for m, f in where.items() if f == fname}
            _merge_shard(base / fname, tmp / fname, adapted, mods, kinds, replace, safe, done_repl)
            done_mods |= mods
            gc.collect()  # free this shard before reading the next one
            if progress:
                _bar(i, len(files), time.perf_counter() - t0)
        missing = sorted(set(replace) - done_repl)
        if missing:
            raise FormatError(
                f"the adapter targets modules the checkpoint lacks: {missing[:10]}"
                + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        for p in base.iterdir():  # config, tokenizer, index...
            if p.is_file() and p.name not in files and p.suffix not in PICKLE_SUFFIXES:
                shutil.copy2(p, tmp / p.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    return {"shards": len(files), "modules": len(done_mods), "replaced": len(done_repl)}


def _merge_shard(src, dst, adapted, mods, kinds, replace, safe, done_repl: set) -> None:
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
            pending.update(_merge_module(adapted, mod, kinds[mod], shard, safe))
            return pending.pop(key)
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

    specs = {k: (v.shape, v.dtype) for k, v in shard.items()}
    io.write_safetensors_streaming(dst, specs, produce, meta or {"format": "pt"})


def _merge_module(adapted, mod: str, kind: str, shard, safe: bool) -> dict[str, np.ndarray]:
    """Merged torch-layout tensors (``weight``, and ``bias`` under IA3) of one module."""
    import jax.numpy as jnp

    from .transforms import merge_and_unload

    group = dict(_get(adapted, mod))
    wkey = f"{mod}.weight"
    leaf, rule = _weight_leaf(kind, shard[wkey].ndim)
    w = rule.from_torch(shard[wkey], rule.flax_shape(shard[wkey].shape))
    group[leaf] = group[leaf].replace(base=jnp.asarray(w))
    if "bias" in group:
        group["bias"] = group["bias"].replace(base=jnp.asarray(shard[f"{mod}.bias"]))
    merged = merge_and_unload({"m": group}, safe=safe)["m"]
    out = {wkey: rule.to_torch(np.asarray(merged[leaf]))}
    if "bias" in merged:
        out[f"{mod}.bias"] = np.asarray(merged["bias"])
    return out


def _bar(i: int, n: int, dt: float, width: int = 24) -> None:
    done = int(width * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'-' * (width - done)}] shard {i}/{n}  {dt:6.1f} s")
    sys.stderr.flush()


# ------------------------------------------------------------------------------------ commands


def _inspect(args) -> int:
    from .io import inspect_adapter

    info = inspect_adapter(args.adapter, args.name)
    ranks = sorted(set(info["ranks"].values()))
    print(f"adapter:        {info['path']}")
    print(f"method:         {info['method']} (peft_type {info['peft_type']})")
    print(f"targets:        {len(info['targets'])} modules")
    for t in info["targets"]:
        r = info["ranks"].get(t)
        print(f"  {t}" + (f"  r={r}" if r is not None else ""))
    if info["modules_to_save"]:
        print(f"modules_to_save: {', '.join(info['modules_to_save'])}")
    if ranks:
        print(f"ranks:          {', '.join(map(str, ranks))}")
    print(f"parameters:     {info['n_params']:,d} in {info['n_tensors']} tensors")
    print(f"dtype:          {info['dtype']}")
    print(f"file size:      {info['file_size']:,d} bytes")
    return 0


def _merge(args) -> int:
    res = merge_checkpoint(args.base, args.adapter, args.out, name=args.name, safe=args.safe)
    print(
        f"merged {res['modules']} modules ({res['replaced']} replaced tensors) over "
        f"{res['shards']} shard(s) into {args.out}"
    )
    return 0


def add_file_commands(sub) -> None:
    i = sub.add_parser("inspect", help="summarise an HF PEFT adapter directory")
    i.add_argument("adapter")
    i.add_argument("--name", default="default")
    i.set_defaults(func=_inspect)
    m = sub.add_parser("merge", help="merge an HF PEFT adapter into an HF safetensors checkpoint")
    m.add_argument("--base", required=True, help="HF checkpoint directory (safetensors)")
    m.add_argument("--adapter", required=True, help="HF PEFT adapter directory")
    m.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    m.add_argument("--name", default="default")
    m.add_argument("--safe", action="store_true", help="refuse non-finite merged weights")
    m.set_defaults(func=_merge)
