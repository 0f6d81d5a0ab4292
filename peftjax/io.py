"""HF PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

This is the only place where arrays change layout. Inside peftjax every adapter array is in Flax
orientation (``in`` before ``out``); on disk it is what HF PEFT's ``save_pretrained`` writes:
torch layouts, keys ``base_model.model.<module path>.<param>`` with the adapter name removed,
float32 by default, ``{"format": "pt"}`` metadata. One table per method (`_rules`) says, for each
adapter array, its PEFT key suffix and how it is transposed:

=========  ====================  ==========================  ====================================
method     array (Flax)          PEFT key suffix             torch layout
=========  ====================  ==========================  ====================================
LoRA       ``lora_A (in, r)``    ``lora_A.weight``           ``[r, in]``; conv ``[r, in, kh, kw]``
           ``lora_B (r, out)``   ``lora_B.weight``           ``[out, r]``; conv ``[out, r, 1, 1]``
embedding  ``lora_A (V, r)``     ``lora_embedding_A``        ``[r, V]``
           ``lora_B (r, D)``     ``lora_embedding_B``        ``[D, r]``
DoRA       ``(out,)``            ``lora_magnitude_vector``   ``[out]``; conv ``[1, out, 1, 1]``
LoHa       ``hada_*`` 2-D        ``hada_w1_a`` ...           transposed
           ``hada_t1/t2``        (effective conv)            ``(kh,kw,r,r)`` -> ``[r,r,kh,kw]``
LoKr       ``lokr_*`` 2-D        ``lokr_w1`` ...             transposed
           ``lokr_w2`` conv      ``lokr_w2``                 ``(kh,kw,d,b)`` -> ``[b,d,kh,kw]``
           ``lokr_t2``           (effective conv)            ``(kh,kw,r,r)`` -> ``[r,r,kh,kw]``
IA3        ``ia3_l (out,)``      ``ia3_l``                   ``[out, 1]``; conv ``[1, out, 1, 1]``
           feedforward ``(in,)``                             ``[1, in]``;  conv ``[1, in, 1, 1]``
LN tuning  a copy of each leaf   ``ln_tuning_layers.<p>``    the leaf in torch layout
to save    a copy of each leaf   ``<p>`` (plain key)         the leaf in torch layout
=========  ====================  ==========================  ====================================

Leaf names map to torch parameter names as ``kernel``/``embedding``/``scale``/``w`` ->
``weight`` and ``b`` -> ``bias``; a 2-D ``kernel`` is transposed, a conv kernel
``(*spatial, in, out)`` becomes ``(out, in, *spatial)``.

Module paths: by default a PEFT module path (the key minus ``base_model.model.`` and the suffix)
*is* the peftjax module path. ``key_map`` is a callable ``(module_path) -> PEFT module path``,
called as ``key_map(module_path, layer)`` for stacked (scanned) weights, whose one stacked
adapter stands for one PEFT module per layer (`stacked_key_map`). The same ``key_map`` serves
`save_pretrained` and `load_pretrained` (which inverts it over the modules of ``params``).

The safetensors format is read and written here directly (an 8-byte header length, a JSON
header, the raw little-endian bytes), so that bfloat16 works without torch.

What the loaders (`load_pretrained`, `read_adapter`, `inspect_adapter`, `read_safetensors`)
refuse, each with a `FormatError` / `ConfigError` naming the file, key or field:

* a safetensors file the reference implementation (safetensors 0.8) refuses: a header over
  100,000,000 bytes or past the file's end, non-UTF-8 or non-JSON headers, a ``__metadata__``
  that is not a str -> str map, unknown dtypes, shapes that are not non-negative integers,
  offsets that do not tile the data exactly (gaps, overlaps, trailing bytes), sizes that do not
  match ``prod(shape) * itemsize``; the header is checked against the file size before any data
  is read (`_parse_header` lists the rules);
* anything but regular files (devices, FIFOs, sockets) and symlinks leading outside the adapter
  directory (an HF hub cache snapshot's ``blobs/`` is inside), before a byte is read; a config
  larger than ``_fs.MAX_JSON_BYTES``; adapter names that are not plain file names;
* integer (or other non-float) adapter tensors; pickle-only adapters;
* an invalid regex in any pattern field of the config;
* a weights file whose ``peftjax.config_sha256`` metadata does not match the config (files of
  two different saves), and, with ``strict=True``, modules the config targets in ``params``
  that the file has no weights for.

`save_pretrained` replaces the weights and the config as one journalled change (see "adapter
dirs" below): a crash at any point leaves the complete old or the complete new adapter, as
peftjax reads it, and no temp files behind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import _fs, paths as P
from .config import (
    PEFT_TYPES,
    AdapterConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    config_from_dict,
)
from .errors import (
    AdapterNameError,
    ConfigError,
    FormatError,
    PeftJaxError,
    ShapeError,
    UnsupportedModuleError,
)
from .layout import LayoutSpec, resolve_layout
from .methods import CopySpec, IA3BiasSpec, IA3Spec, LoHaSpec, LoKrSpec, LoraSpec, Spec
from .node import is_adapted
from .transforms import _modules, _walk, _weight_leaf, inject

__all__ = [
    "CONFIG_NAME",
    "DIGEST_KEY",
    "JOURNAL_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "config_digest",
    "embedding_base_keys",
    "inspect_adapter",
    "load_pretrained",
    "read_adapter",
    "read_safetensors",
    "read_safetensors_header",
    "save_pretrained",
    "stacked_key_map",
    "write_safetensors",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."

KeyMap = Callable[..., str]

# ---------------------------------------------------------------------------------- safetensors

_DTYPES: dict[str, Any] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "C64": np.dtype(np.complex64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: Every dtype name the safetensors format knows, with its size in bits (the sub-byte ones are
#: valid in a file but have no numpy dtype here: reading such a tensor raises `FormatError`).
_DTYPE_BITS: dict[str, int] = {
    **{k: v.itemsize * 8 for k, v in _DTYPES.items()},
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
#: The safetensors reference implementation's limit on the JSON header.
_MAX_HEADER = 100_000_000
_USIZE = 2**64
_MAX_DEPTH = 127  # serde_json's recursion limit, as the reference reader meets it


class _Pairs(list):
    """A JSON object as its ``(key, value)`` pairs (duplicates kept), from ``object_pairs_hook``."""


def _parse_int(s: str) -> int | float:
    return -0.0 if s == "-0" else int(s)  # serde_json reads `-0` as a float


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_text(s: str, what: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {s!r} holds an unpaired surrogate escape") from None
    return s


def _usize(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _USIZE:
        raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    return v


def _parse_header(
    raw: bytes, data_len: int
) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate a safetensors JSON header as the reference implementation (safetensors 0.8)
    does, against a data buffer of ``data_len`` bytes. Returns ``({key: (dtype name, shape,
    start, end)}, metadata)``; raises ``ValueError`` saying what is wrong.

    The rules: UTF-8 JSON (no NaN/Infinity, no unpaired surrogates) holding an object; an
    optional ``__metadata__`` (at most once; ``null`` or a str -> str map); every other key a
    tensor ``{"dtype": known name, "shape": [non-negative ints], "data_offsets": [start, end]}``
    (other fields ignored; a repeated tensor key: the last one counts); sorted by offsets the
    tensors tile the data buffer exactly from byte 0 (no gaps, no overlaps, no trailing bytes);
    each one's size is ``prod(shape) * bits / 8``, a whole number of bytes.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"header is not UTF-8: {e}") from None
    try:
        top = json.loads(
            text, object_pairs_hook=_Pairs, parse_constant=_no_constant, parse_int=_parse_int
        )
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, huge integers
        raise ValueError(f"header is not valid JSON: {e}") from None
    if not isinstance(top, _Pairs):
        raise ValueError(f"header is a JSON {type(top).__name__}, not an object")
    _check_json(top)
    meta: dict[str, str] = {}
    seen_meta = False
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, info in top:
        if key == "__metadata__":
            if seen_meta:
                raise ValueError("`__metadata__` appears twice")
            seen_meta = True
            if info is None:
                continue
            if not isinstance(info, _Pairs):
                raise ValueError(f"`__metadata__` must map str to str, got {_plain(info)!r}")
            for mk, mv in info:
                if not isinstance(mv, str):
                    raise ValueError(
                        f"`__metadata__` must map str to str; `{mk}` is {_plain(mv)!r}"
                    )
                meta[mk] = mv
            continue
        if not isinstance(info, _Pairs):
            raise ValueError(f"tensor `{key}`: expected an object, got {_plain(info)!r}")
        fields: dict[str, Any] = {}
        for fk, fv in info:
            if fk in ("dtype", "shape", "data_offsets"):
                if fk in fields:
                    raise ValueError(f"tensor `{key}`: field `{fk}` appears twice")
                fields[fk] = fv
        for fk in ("dtype", "shape", "data_offsets"):
            if fk not in fields:
                raise ValueError(f"tensor `{key}`: missing field `{fk}`")
        dt, shape, offs = fields["dtype"], fields["shape"], fields["data_offsets"]
        if not isinstance(dt, str) or dt not in _DTYPE_BITS:
            raise ValueError(
                f"tensor `{key}`: unknown dtype {_plain(dt)!r} (safetensors knows "
                f"{sorted(_DTYPE_BITS)})"
            )
        if not isinstance(shape, list):
            raise ValueError(f"tensor `{key}`: shape {_plain(shape)!r} is not a list")
        shape = tuple(_usize(s, f"tensor `{key}`: every shape entry") for s in shape)
        if not isinstance(offs, list) or len(offs) != 2:
            raise ValueError(f"tensor `{key}`: data_offsets {_plain(offs)!r} is not [start, end]")
        start, end = (_usize(o, f"tensor `{key}`: data_offsets") for o in offs)
        entries[key] = (dt, shape, start, end)
    pos = 0
    for key, (dt, shape, start, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start != pos or end < start:
            raise ValueError(
                f"tensor `{key}`: data_offsets [{start}, {end}] do not follow the previous tensor "
                f"(ending at byte {pos}); tensors must tile the data without gaps or overlaps"
            )
        bits = math.prod(shape) * _DTYPE_BITS[dt]
        if bits % 8 or bits // 8 != end - start or bits // 8 >= _USIZE:
            raise ValueError(
                f"tensor `{key}`: {end - start} bytes for shape {list(shape)} {dt} "
                f"({bits / 8:g} bytes expected)"
            )
        pos = end
    if pos != data_len:
        raise ValueError(
            f"the tensors cover {pos} bytes of a {data_len}-byte data buffer"
            + (" (trailing bytes)" if pos < data_len else "")
        )
    return entries, meta


def _plain(v: Any) -> Any:
    """A parsed JSON value with `_Pairs` turned back into dicts (for messages)."""
    if isinstance(v, _Pairs):
        return {k: _plain(x) for k, x in v}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _check_json(top: _Pairs) -> None:
    """What serde_json refuses and Python's json accepts: strings with an unpaired surrogate
    escape, and nesting deeper than 127 arrays/objects."""
    stack: list[tuple[Any, int]] = [(top, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, str):
            _check_text(x, "string")
        elif isinstance(x, (_Pairs, list)):
            if depth > _MAX_DEPTH:
                raise ValueError(f"header JSON is nested more than {_MAX_DEPTH} levels deep")
            for y in x:
                if isinstance(x, _Pairs):
                    _check_text(y[0], "key")
                    y = y[1]
                stack.append((y, depth + 1))


def _open_checked(path: Path, what: str, roots=None):
    """``(file, size)``: ``path`` opened for reading after `_fs.check_regular_file` (no device,
    FIFO or link out of its directory), with ``O_NONBLOCK`` and an ``fstat`` that must show the
    same regular file."""
    st = _fs.check_regular_file(path, what, roots=roots)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FormatError(f"{what}: cannot open `{path}`: {e.strerror or e}.") from None
    f = os.fdopen(fd, "rb")
    fst = os.fstat(f.fileno())
    if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        f.close()
        raise FormatError(f"{what}: `{path}` changed while being opened; refusing it.")
    return f, fst.st_size


def _read_exactly(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{what}: `{path}` shrank while being read; refusing it.")
    return data


def _header_of(f, size: int, path: Path, what: str):
    """Read and validate the header of an open safetensors file of ``size`` bytes."""

    def bad(why: str) -> FormatError:
        return FormatError(f"{what}: `{path}` is not a valid safetensors file ({why}).")

    if size < 8:
        raise bad(f"only {size} bytes; is it truncated?")
    (n,) = struct.unpack("<Q", _read_exactly(f, 8, path, what))
    if n > _MAX_HEADER or n > size - 8:
        raise bad(
            f"header length {n} in a file of {size} bytes (at most {_MAX_HEADER:,d} and the "
            "file size); is it truncated?"
        )
    raw = _read_exactly(f, n, path, what)
    try:
        entries, meta = _parse_header(raw, size - 8 - n)
    except ValueError as e:
        raise bad(str(e)) from None
    return n, entries, meta


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> None:
    """Write ``tensors`` as a safetensors file, atomically (temp file + ``os.replace``)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
    write_safetensors_streaming(path, specs, arrays.__getitem__, metadata)


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    produce,
    metadata: Mapping[str, str] | None,
) -> None:
    """Write a safetensors file whose tensors are made one at a time by ``produce(key)``.

    ``specs`` gives each tensor's shape and dtype, so the header is written first and no more
    than one produced tensor is held at a time. Atomic: a temp file renamed when complete.
    """
    _atomic_write(Path(path), _safetensors_chunks(specs, produce, metadata))


def _safetensors_chunks(specs, produce, metadata):
    """The bytes of a safetensors file, in pieces (see `write_safetensors_streaming`)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    keys = sorted(specs)
    for key in keys:
        shape, dtype = specs[key]
        dtype = np.dtype(dtype)
        if dtype not in _DTYPE_NAMES:
            raise FormatError(f"tensor `{key}`: dtype {dtype} cannot be stored in safetensors.")
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": _DTYPE_NAMES[dtype.newbyteorder("=")],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    yield struct.pack("<Q", len(head))
    yield head
    for key in keys:
        a = np.asarray(produce(key))
        shape, dtype = specs[key]
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
            raise FormatError(
                f"tensor `{key}`: expected {list(shape)} {np.dtype(dtype)}, got "
                f"{list(a.shape)} {a.dtype}."
            )
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        yield memoryview(a.reshape(-1).view(np.uint8))


def read_safetensors_header(
    path: str | os.PathLike, *, roots=None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each tensor's ``(shape, dtype)`` from a safetensors file's header alone (no data read).

    The header is validated exactly as `read_safetensors` does (against the file's size), so a
    file this accepts is one `read_safetensors` reads. ``roots``: where a symlink may lead
    (default: the file's own directory, see `peftjax._fs`)."""
    path = Path(path)
    what = "safetensors file"
    f, size = _open_checked(path, what, roots)
    with f:
        _, entries, _ = _header_of(f, size, path, what)
    return {k: (shape, _np_dtype(k, dt, path)) for k, (dt, shape, _, _) in entries.items()}


def _np_dtype(key: str, dt: str, path: Path) -> np.dtype:
    if dt not in _DTYPES:
        raise FormatError(
            f"`{path}`: tensor `{key}` has dtype {dt}, a sub-byte type peftjax cannot read."
        )
    return _DTYPES[dt]


def read_safetensors(
    path: str | os.PathLike, *, roots=None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; `FormatError` naming the file if it is
    missing, not a regular file (device, FIFO, a link out of its directory), truncated or
    malformed. Accepts exactly the files the safetensors reference implementation accepts (see
    `_parse_header`); the header is checked against the file size before any data is read.
    Tensors are read-only views of the file's bytes (one copy of the file in memory)."""
    path = Path(path)
    what = "safetensors file"
    f, size = _open_checked(path, what, roots)
    with f:
        n, entries, meta = _header_of(f, size, path, what)
        dtypes = {k: _np_dtype(k, dt, path) for k, (dt, _, _, _) in entries.items()}
        data = _read_exactly(f, size - 8 - n, path, what)
        if f.read(1):
            raise FormatError(f"{what}: `{path}` grew while being read; refusing it.")
    buf = memoryview(data)
    out: dict[str, np.ndarray] = {}
    for key, (_, shape, start, end) in entries.items():
        dt = dtypes[key]
        le = dt.newbyteorder("<")
        out[key] = np.frombuffer(buf[start:end], le).astype(dt, copy=False).reshape(shape)
    return out, meta


def _atomic_write(path: Path, chunks) -> None:
    """Write one file atomically: a fsynced peftjax temp file renamed over ``path``."""
    tmp = path.parent / _write_temp(path.parent, path.name, chunks)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------- adapter dirs
#
# Crash safety of `save_pretrained`. An adapter is two files that must change together, which
# no single rename can do, so a save is journalled:
#
# 1. under an exclusive ``flock`` on the adapter directory, finish or undo any earlier
#    interrupted save (`_recover`);
# 2. write the new weights and config to temp files ``.peftjax-tmp-*`` in the directory, fsync;
# 3. write the journal ``.peftjax-save.json`` (``{"renames": [[temp, final], ...]}``) to a temp
#    file, fsync, and rename it into place: **the commit point**;
# 4. rename each temp file over its final name, fsync the directory, delete the journal, fsync.
#
# Every peftjax reader and writer of the directory (`load_pretrained`, `read_adapter`,
# `inspect_adapter`, `save_pretrained`) first recovers, under the same exclusive lock: a journal
# means the save committed, so the renames whose temp file still exists are redone and the
# journal deleted; peftjax temp files without a journal belong to a save that never committed
# and are deleted. So a kill at any point leaves, as peftjax reads it, the complete old adapter or
# the complete new one, and no temp files accumulate. Readers hold a shared lock while reading.
#
# Tears made by other tools (a config copied over from another adapter) are caught by a digest:
# the weights' safetensors metadata holds ``peftjax.config_sha256``, the SHA-256 of the config's
# math (its parsed fields minus bookkeeping such as ``base_model_name_or_path``); a loader refuses
# a pair whose digest disagrees. PEFT ignores unknown metadata, so the files stay PEFT's.

try:  # POSIX; elsewhere saves are journalled but not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

JOURNAL_NAME = ".peftjax-save.json"
DIGEST_KEY = "peftjax.config_sha256"
_TMP_PREFIX = ".peftjax-tmp-"
#: Config fields that do not change what an adapter computes (a digest ignores them).
_BOOKKEEPING = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
    }
)


def _is_temp(name: str) -> bool:
    """peftjax's own temp files in an adapter directory (this version's and the older
    ``.<final name>.<random>.tmp`` of `_atomic_write`)."""
    if name.startswith(_TMP_PREFIX):
        return True
    return name.endswith(".tmp") and name.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}."))


@contextlib.contextmanager
def _dir_lock(d: Path, exclusive: bool):
    """An ``flock`` on the directory itself (no lock file is left behind); yields its fd."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise FormatError(f"cannot open adapter directory `{d}`: {e.strerror or e}.") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass


def _needs_recovery(d: Path) -> bool:
    try:
        return any(n == JOURNAL_NAME or _is_temp(n) for n in os.listdir(d))
    except OSError:
        return False


def _journal_pairs(j: Path) -> list[tuple[str, str]]:
    raw = _fs.read_regular_file(j, "save journal", max_bytes=1 << 16)
    try:
        pairs = json.loads(raw)["renames"]
        out = []
        for tmp, final in pairs:
            _fs.check_plain_name(tmp, f"`{j}`")
            if not tmp.startswith(_TMP_PREFIX) or final not in (WEIGHTS_NAME, CONFIG_NAME):
                raise ValueError(f"unexpected rename {tmp!r} -> {final!r}")
            out.append((tmp, final))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(
            f"`{j}` is not a peftjax save journal ({e}); remove it if no save is running."
        ) from None


def _recover(d: Path, fd: int) -> None:
    """Finish (journal present) or undo (temp files only) an interrupted save; needs the
    exclusive lock."""
    j = d / JOURNAL_NAME
    changed = False
    if os.path.lexists(j):
        for tmp, final in _journal_pairs(j):
            if os.path.lexists(d / tmp):
                os.replace(d / tmp, d / final)
        _fsync_dir(fd)
        os.unlink(j)
        changed = True
    for n in os.listdir(d):
        if _is_temp(n):
            try:
                os.unlink(d / n)
                changed = True
            except FileNotFoundError:
                pass
    if changed:
        _fsync_dir(fd)


def _write_temp(d: Path, final: str, chunks) -> str:
    """Write ``chunks`` to a new peftjax temp file in ``d`` (fsynced); returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix="." + final, dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return os.path.basename(tmp)


def _commit(d: Path, files: list[tuple[str, Any]]) -> None:
    """Replace ``files`` (``[(final name, chunks)]``) in ``d`` as one journalled change."""
    with _dir_lock(d, exclusive=True) as fd:
        _recover(d, fd)
        pairs: list[tuple[str, str]] = []
        try:
            for final, chunks in files:
                pairs.append((_write_temp(d, final, chunks), final))
            journal = json.dumps({"renames": pairs}).encode()
            jtmp = _write_temp(d, "journal", [journal])
        except BaseException:
            for tmp, _ in pairs:
                if os.path.lexists(d / tmp):
                    os.unlink(d / tmp)
            raise
        os.replace(d / jtmp, d / JOURNAL_NAME)  # the commit point
        _fsync_dir(fd)
        for tmp, final in pairs:
            os.replace(d / tmp, d / final)
        _fsync_dir(fd)
        os.unlink(d / JOURNAL_NAME)
        _fsync_dir(fd)


def config_digest(raw: Mapping[str, Any]) -> str:
    """SHA-256 of what a parsed ``adapter_config.json`` makes an adapter compute (its fields
    minus bookkeeping such as ``base_model_name_or_path``), as stored under `DIGEST_KEY`."""
    d = config_from_dict(raw).to_dict()
    core = {k: v for k, v in d.items() if k not in _BOOKKEEPING}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class _Files:
    """An adapter directory as read: the parsed config and the weights."""

    dir: Path
    raw: dict
    config: AdapterConfig
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def _read_dir(d: Path) -> _Files:
    """Read an adapter directory safely: recover an interrupted peftjax save first, then read
    the config and the weights under a shared lock, and check the weights' config digest."""
    with _dir_lock(d, exclusive=False):
        if not _needs_recovery(d):
            return _read_files(d)
    if not os.access(d, os.W_OK):
        if os.path.lexists(d / JOURNAL_NAME):
            raise FormatError(
                f"`{d}` holds an interrupted peftjax save (`{JOURNAL_NAME}`) and is read-only, "
                "so it cannot be completed; make it writable and load again."
            )
        with _dir_lock(d, exclusive=False):
            return _read_files(d)
    with _dir_lock(d, exclusive=True) as fd:
        _recover(d, fd)
        return _read_files(d)


def _read_files(d: Path) -> _Files:
    raw = _read_config_dict(d)
    f = d / CONFIG_NAME
    try:
        config = config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"`{f}`: {e}") from None
    tensors, meta = _read_weights(d)
    want = meta.get(DIGEST_KEY)
    if want is not None and want != config_digest(raw):
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` was saved with a different `{CONFIG_NAME}` than `{f}` (its "
            f"`{DIGEST_KEY}` metadata does not match): the two files come from different saves, "
            "and loading them would give the wrong ranks or scaling. Save the adapter again, or "
            "restore the matching config."
        )
    return _Files(d, raw, config, tensors, meta)


# ---------------------------------------------------------------------------------- layout rules


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one Flax array (one layer) is stored in torch layout.

    ``code``: ``id``; ``T`` (2-D transpose); ``conv`` (``(*sp, x, y)`` <-> ``(y, x, *sp)``);
    ``convB`` (``(r, out)`` <-> ``(out, r, 1, ..)``); ``col`` (``(n,)`` <-> ``(n, 1)``); ``row``
    (``(n,)`` <-> ``(1, n)``); ``vconv`` (``(n,)`` <-> ``(1, n, 1, ..)``).
    """

    code: str
    nsp: int = 0

    def torch_shape(self, s: tuple[int, ...]) -> tuple[int, ...]:
        c, ones = self.code, (1,) * self.nsp
        if c == "T":
            return tuple(reversed(s))
        if c == "conv":
            return (s[-1], s[-2], *s[:-2])
        if c == "convB":
            return (s[1], s[0], *ones)
        if c == "col":
            return (s[0], 1)
        if c == "row":
            return (1, s[0])
        if c == "vconv":
            return (1, s[0], *ones)
        return tuple(s)

    def flax_shape(self, t: tuple[int, ...]) -> tuple[int, ...]:
        """Inverse of `torch_shape`."""
        c = self.code
        if c == "T":
            return tuple(reversed(t))
        if c == "conv":
            return (*t[2:], t[1], t[0])
        if c == "convB":
            return (t[1], t[0])
        if c == "col":
            return (t[0],)
        if c in ("row", "vconv"):
            return (t[1],)
        return tuple(t)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        c = self.code
        if c == "T":
            return a.T
        if c == "conv":
            return np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)))
        if c == "convB":
            return a.T.reshape(self.torch_shape(a.shape))
        return a.reshape(self.torch_shape(a.shape))

    def from_torch(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        c = self.code
        if c == "T":
            return t.T
        if c == "conv":
            return np.transpose(t, (*range(2, t.ndim), 1, 0))
        if c == "convB":
            return t.reshape(t.shape[:2]).T
        return t.reshape(shape)


def _effective(spec: Spec) -> bool:
    """Whether a LoHa / LoKr conv adapter is in PEFT's effective-conv (Tucker) form."""
    return bool(getattr(spec, "effective_conv", False))


def _spatial(spec: Spec) -> tuple[int, ...]:
    return tuple(spec.layout.spatial(spec.shape))


def _nsp(spec: Spec) -> int:
    return len(_spatial(spec))


def _rules(spec: Spec) -> dict[str, tuple[str, _Rule]]:
    """``{array name: (PEFT key suffix, rule)}`` of one adapter spec."""
    kind, nsp = spec.layout.kind, _nsp(spec)
    if isinstance(spec, LoraSpec):
        if kind == "embed":
            out = {
                "lora_A": ("lora_embedding_A", _Rule("T")),
                "lora_B": ("lora_embedding_B", _Rule("T")),
            }
            mag = _Rule("id")
        elif kind == "conv":
            out = {
                "lora_A": ("lora_A.weight", _Rule("conv")),
                "lora_B": ("lora_B.weight", _Rule("convB", nsp)),
            }
            mag = _Rule("vconv", nsp)
        else:
            out = {"lora_A": ("lora_A.weight", _Rule("T")), "lora_B": ("lora_B.weight", _Rule("T"))}
            mag = _Rule("id")
        if spec.use_dora:
            out["lora_magnitude_vector"] = ("lora_magnitude_vector", mag)
        return out
    if isinstance(spec, LoHaSpec):
        out = {n: (n, _Rule("T")) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        if _effective(spec):  # Tucker cores [r, r, kh, kw] <-> (kh, kw, r, r)
            out.update({n: (n, _Rule("conv")) for n in ("hada_t1", "hada_t2")})
        return out
    if isinstance(spec, LoKrSpec):
        names = ["lokr_w1"] if spec.use_w1 else ["lokr_w1_a", "lokr_w1_b"]
        names += ["lokr_w2"] if spec.use_w2 else ["lokr_w2_a", "lokr_w2_b"]
        if _effective(spec):
            names.append("lokr_t2")
        conv = kind == "conv"
        return {
            n: (n, _Rule("conv" if conv and n in ("lokr_w2", "lokr_t2") else "T")) for n in names
        }
    if isinstance(spec, IA3Spec):
        code = "vconv" if kind == "conv" else ("row" if spec.feedforward else "col")
        return {"ia3_l": ("ia3_l", _Rule(code, nsp))}
    return {}


#: PEFT key suffixes of each method's adapter parameters (the `_t*` ones: effective conv).
_SUFFIXES = {
    "LORA": (
        "lora_A.weight",
        "lora_B.weight",
        "lora_B.bias",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    ),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "IA3": ("ia3_l",),
    "LN_TUNING": (),
}
_LN = "ln_tuning_layers"
_BASE_LAYER = "base_layer"
_TORCH_NAMES = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "w": "weight",
    "b": "bias",
}


def _torch_name(leaf_name: str) -> str:
    return _TORCH_NAMES.get(leaf_name, leaf_name)


def _leaf_rule(leaf_name: str, shape: tuple[int, ...]) -> _Rule:
    """Torch layout of a whole leaf (modules_to_save / LN tuning copies, base layers)."""
    if leaf_name == "kernel" and len(shape) == 2:
        return _Rule("T")
    if leaf_name == "kernel" and len(shape) >= 3:
        return _Rule("conv")
    return _Rule("id")


def _split_key(key: str, peft_type: str) -> tuple[str, str, str]:
    """``(kind, PEFT module path, suffix)`` of a file key; kind is ``adapter`` (suffix from the
    method table), ``ln`` (an LN tuning copy), ``base`` (a ``base_layer`` weight PEFT saves with
    targeted embeddings) or ``copy`` (a ``modules_to_save`` parameter)."""
    k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for suffix in _SUFFIXES.get(peft_type, ()):
        if k.endswith("." + suffix):
            return "adapter", k[: -len(suffix) - 1], suffix
    mod, _, param = k.rpartition(".")
    if mod.endswith("." + _LN) or mod == _LN:
        return "ln", mod[: -len(_LN)].rstrip("."), param
    if mod.endswith("." + _BASE_LAYER):
        return "base", mod[: -len(_BASE_LAYER) - 1], param
    return "copy", mod, param


# ---------------------------------------------------------------------------------- key maps


def stacked_key_map(layers_name: str = "layers") -> KeyMap:
    """A ``key_map`` for stacked (scanned) layers: ``(module_path, layer=None) -> PEFT path``.

    Unstacked paths are returned unchanged; a stacked path gets the layer index inserted after
    its ``layers_name`` segment: ``model.layers.self_attn.q_proj`` with layer 3 becomes
    ``model.layers.3.self_attn.q_proj``. This is the default ``key_map``.

    >>> stacked_key_map()("model.layers.self_attn.q_proj", 3)
    'model.layers.3.self_attn.q_proj'
    """

    def key_map(path: str, layer: int | None = None) -> str:
        if layer is None:
            return path
        parts = path.split(".")
        if layers_name not in parts:
            raise FormatError(
                f"stacked module `{path}` has no `{layers_name}` segment to put the layer index "
                f"after; pass `key_map=pj.io.stacked_key_map(layers_name=...)` or your own "
                "`key_map(module_path, layer) -> PEFT module path`."
            )
        i = parts.index(layers_name)
        return ".".join([*parts[: i + 1], str(layer), *parts[i + 1 :]])

    return key_map


def _map(key_map: KeyMap, path: str, layer: int | None) -> str:
    out = key_map(path) if layer is None else key_map(path, layer)
    if not isinstance(out, str):
        raise FormatError(f"`key_map({path!r})` returned {out!r}; it must return a str.")
    return out


# ---------------------------------------------------------------------------------- save


def _layers(spec: Spec) -> list[int | None]:
    """Layer indices of a spec that carry the adapter (``[None]`` when not stacked): the stored
    slices (`Spec.layers`) with a nonzero scaling."""
    if not spec.layout.stack:
        return [None]
    return [i for i in spec.stored_layers if spec.scaling[i] != 0]


@dataclasses.dataclass
class _Entry:
    """One adapted PEFT module of an adapter: where it lives and its static spec."""

    peft_path: str
    module: str
    layer: int | None
    spec: Spec


#: PEFT's ``EMBEDDING_LAYER_NAMES``: modules ``save_embedding_layers=True`` writes.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _writes_base(spec: Spec, leaf, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers is False or isinstance(spec, (CopySpec, IA3BiasSpec)):
        return False
    if spec.carries_base:
        return True
    return save_embedding_layers is True and (
        spec.layout.kind == "embed" or leaf.module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
    )


def _collect(
    params, name: str, key_map: KeyMap, dtype, save_embedding_layers: bool | str = "auto"
) -> tuple[dict, list[_Entry], list]:
    """``(tensors, adapter entries, copy entries)`` of adapter ``name``, in PEFT form."""
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    entries: list[_Entry] = []
    copies: list[tuple[str, str]] = []  # (kind, PEFT module path)

    def put(key: str, value: np.ndarray, where: str):
        if key in tensors:
            raise FormatError(
                f"`key_map` sends both `{owner[key]}` and `{where}` to the PEFT key `{key}`."
            )
        owner[key] = where
        if jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(np.float32 if dtype is None else jnp.dtype(dtype))
        tensors[key] = np.ascontiguousarray(value)

    all_leaves = _walk(params)[0]
    by_module = _modules(all_leaves)
    for leaf in all_leaves:
        node = leaf.value
        if not is_adapted(node) or name not in node.names:
            continue
        spec, arrays = node.spec(name), node.arrays[name]
        where = ".".join(leaf.names)
        if _writes_base(spec, leaf, save_embedding_layers):
            if spec.layout.stack:
                raise FormatError(
                    f"`{where}`: saving the base weights of a stacked module is not supported."
                )
            pm = _map(key_map, leaf.module, None)
            for other in by_module[leaf.module]:
                if other is not leaf and is_adapted(other.value):
                    continue  # another adapted leaf of the module: written with its own flag
                b = other.value.base if is_adapted(other.value) else other.value
                b = np.asarray(b)
                tname = _torch_name(other.name)
                put(
                    f"{PREFIX}{pm}.{_BASE_LAYER}.{tname}",
                    _leaf_rule(other.name, b.shape).to_torch(b),
                    where,
                )
        if isinstance(spec, IA3BiasSpec):
            continue
        if isinstance(spec, CopySpec):
            if spec.layout.stack:
                raise FormatError(
                    f"`{where}`: saving a stacked {spec.kind} copy is not supported; PEFT has "
                    "one module per layer."
                )
            pm = _map(key_map, leaf.module, None)
            tname = _torch_name(leaf.name)
            mid = f"{_LN}." if spec.kind == "ln_tuning" else ""
            a = np.asarray(arrays["weight"])
            put(f"{PREFIX}{pm}.{mid}{tname}", _leaf_rule(leaf.name, a.shape).to_torch(a), where)
            copies.append((spec.kind, pm))
            continue
        rules = _rules(spec)
        if not rules:
            raise FormatError(
                f"`{where}`: adapter {name!r} ({spec.describe()}) has no PEFT format."
            )
        host = {n: np.asarray(arrays[n]) for n in rules}  # one device -> host copy per array
        for i in _layers(spec):
            pm = _map(key_map, leaf.module, i)
            entries.append(_Entry(pm, leaf.module, i, spec))
            layer = host if i is None else spec.layer_arrays(host, i)  # stored slice of layer i
            for arr_name, (suffix, rule) in rules.items():
                put(f"{PREFIX}{pm}.{suffix}", rule.to_torch(layer[arr_name]), where)
    return tensors, entries, copies


def _alpha(scale: float, r: int, rslora: bool = False) -> int | float:
    a = scale * (math.sqrt(r) if rslora else r)
    ra = round(a)
    return int(ra) if abs(a - ra) <= 1e-9 * max(1.0, abs(a)) else a


def _common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _one(entries: list[_Entry], field: str, get) -> Any:
    vals = {get(e.spec) for e in entries}
    if len(vals) > 1:
        raise ConfigError(
            f"the adapter's modules disagree on `{field}` ({sorted(map(repr, vals))}), which an "
            "adapter_config.json holds once; pass `config=` to `save_pretrained`."
        )
    return vals.pop()


def config_from_specs(entries: list[_Entry], copies: list[tuple[str, str]]) -> AdapterConfig:
    """Rebuild a PEFT config from the specs of one adapter (targets = exact PEFT paths).

    ``r`` and ``alpha`` are the most common values; modules that differ get exact-path entries
    in ``rank_pattern`` / ``alpha_pattern``. LoRA alpha is ``scaling * r``, or
    ``scaling * sqrt(r)`` with ``use_rslora=True`` when that gives whole numbers and fewer
    patterns (both give exactly the adapter's scalings).
    """
    mts = sorted({pm for kind, pm in copies if kind == "modules_to_save"}) or None
    ln = sorted({pm for kind, pm in copies if kind == "ln_tuning"})
    if not entries:
        if ln:
            return LNTuningConfig(target_modules=ln, modules_to_save=mts, inference_mode=True)
        raise ConfigError(
            "the adapter holds only `modules_to_save` copies; PEFT needs a method config: pass "
            "`config=` to `save_pretrained`."
        )
    if ln:
        raise ConfigError("an adapter mixing LN tuning with another method has no PEFT config.")
    methods = {e.spec.method for e in entries}
    if len(methods) > 1:
        raise ConfigError(f"the adapter mixes methods {sorted(methods)}; PEFT has one per adapter.")
    method = methods.pop()
    targets = sorted({e.peft_path for e in entries})
    common: dict[str, Any] = dict(target_modules=targets, modules_to_save=mts, inference_mode=True)
    if method == "ia3":
        ff = sorted({e.peft_path for e in entries if e.spec.feedforward}) or None
        init = _one(entries, "init_ia3_weights", lambda s: s.init_weights)
        return IA3Config(**common, feedforward_modules=ff, init_ia3_weights=init)
    rank = {e.peft_path: e.spec.r for e in entries}

    def alphas(rslora: bool) -> dict[str, int | float]:
        return {
            e.peft_path: _alpha(e.spec.scaling[e.layer or 0], e.spec.r, rslora) for e in entries
        }

    def untidy(a: dict) -> tuple[int, int]:
        return sum(isinstance(v, float) for v in a.values()), len(set(a.values()))

    alpha, rslora = alphas(False), False
    if method == "lora" and untidy(alphas(True)) < untidy(alpha):
        alpha, rslora = alphas(True), True  # e.g. an rsLoRA adapter: whole alphas, fewer patterns
    r0, a0 = _common(list(rank.values())), _common(list(alpha.values()))
    rp = {k: v for k, v in sorted(rank.items()) if v != r0}
    ap = {k: v for k, v in sorted(alpha.items()) if v != a0}
    common.update(r=r0, rank_pattern=rp, alpha_pattern=ap)
    if method == "lora":
        return LoraConfig(
            **common,
            use_rslora=rslora,
            lora_alpha=a0,
            use_dora=_one(entries, "use_dora", lambda s: s.use_dora),
            lora_dropout=_one(entries, "lora_dropout", lambda s: s.lora_dropout),
            init_lora_weights=_one(entries, "init_lora_weights", lambda s: s.init_weights),
        )
    lyco = dict(
        alpha=a0,
        rank_dropout=_one(entries, "rank_dropout", lambda s: s.rank_dropout),
        module_dropout=_one(entries, "module_dropout", lambda s: s.module_dropout),
        init_weights=_one(entries, "init_weights", lambda s: s.init_weights),
    )
    # PEFT's flag only matters for conv kernels larger than 1x1: read it from those
    big = [e for e in entries if e.spec.layout.kind == "conv" and math.prod(_spatial(e.spec)) > 1]
    effective = _one(big, "use_effective_conv2d", _effective) if big else False
    if method == "loha":
        return LoHaConfig(**common, **lyco, use_effective_conv2d=effective)
    return LoKrConfig(
        **common,
        **lyco,
        use_effective_conv2d=_one(
            big or entries, "use_effective_conv2d", lambda s: s.use_effective_conv2d
        )
        if hasattr(entries[0].spec, "use_effective_conv2d")
        else effective,
        decompose_both=_one(entries, "decompose_both", lambda s: s.decompose_both),
        decompose_factor=_one(entries, "decompose_factor", lambda s: s.decompose_factor),
        rank_dropout_scale=_one(entries, "rank_dropout_scale", lambda s: s.rank_dropout_scale),
    )


def _module_r_alpha(config: AdapterConfig, peft_path: str) -> tuple[int, float]:
    r = P.get_pattern_value(peft_path, config.rank_pattern, config.r)
    default_alpha = config.lora_alpha if isinstance(config, LoraConfig) else config.alpha
    return int(r), P.get_pattern_value(
        peft_path, config.alpha_pattern, default_alpha, "alpha_pattern"
    )


def _check_config(config: AdapterConfig, entries: list[_Entry]) -> None:
    """A `config=` given to `save_pretrained` must describe the adapter that is saved."""
    methods = {e.spec.method for e in entries}
    if entries and methods != {config.method}:
        raise ConfigError(
            f"`config` is a {type(config).__name__} but the adapter is {sorted(methods)}."
        )
    targets = config.target_modules
    for e in entries:
        hit = (
            P.is_all_linear(targets)
            or P.matches_target(
                e.peft_path,
                targets,
                layers_to_transform=getattr(config, "layers_to_transform", None),
                layers_pattern=getattr(config, "layers_pattern", None),
            )
        ) and not P.is_excluded(e.peft_path, config.exclude_modules)
        if not hit:
            raise ConfigError(
                f"`config` does not target module `{e.peft_path}`, which carries the adapter; "
                "PEFT would not load its weights."
            )
        if isinstance(config, IA3Config) and e.spec.feedforward != _is_ff(
            e.peft_path, config.feedforward_modules
        ):
            raise ConfigError(
                f"`config.feedforward_modules` disagrees with the adapter on `{e.peft_path}`."
            )
    if config.method not in ("lora", "loha", "lokr"):
        return
    for e in entries:
        r, alpha = _module_r_alpha(config, e.peft_path)
        s = config.scaling(r, alpha)
        have = e.spec.scaling[e.layer or 0]
        if r != e.spec.r or not math.isclose(s, have, rel_tol=1e-6):
            raise ConfigError(
                f"`config` gives module `{e.peft_path}` r={r}, scaling={s:g}, but its adapter has "
                f"r={e.spec.r}, scaling={have:g}; PEFT would compute a different delta."
            )


def save_pretrained(
    params,
    path: str | os.PathLike,
    name: str = "default",
    *,
    key_map: KeyMap | None = None,
    dtype=None,
    config: AdapterConfig | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Write adapter ``name`` in HF PEFT's format: safetensors weights + ``adapter_config.json``.

    The two files are replaced together (a journalled commit, see the module docstring): after a
    crash at any point, a peftjax loader finds the complete old adapter or the complete new one.

    Args:
      params: a tree carrying adapter ``name``.
      path: the output directory (created if needed). As PEFT, the ``default`` adapter is written
        in ``path`` itself and any other in ``path/<name>/``.
      name: the adapter to save.
      key_map: ``(module_path[, layer]) -> PEFT module path``; default `stacked_key_map()`
        (identity, with ``.layers.<i>.`` inserted for stacked weights).
      dtype: dtype of the saved float tensors (default float32, PEFT's default).
      config: the config to write. Default: rebuilt from the adapter's specs (targets are the
        exact PEFT module paths; per-module ranks and alphas in ``rank_pattern`` /
        ``alpha_pattern``). A given config is checked against the adapter's ranks and scalings.
      save_embedding_layers: PEFT's argument: ``"auto"`` writes the base weights of modules
        whose adapter carries them (loaded from a PEFT file with ``<module>.base_layer.weight``
        keys); ``True`` also writes them for every adapted embedding / ``embed_tokens`` /
        ``lm_head`` module; ``False`` never writes base weights.

    Returns:
      The directory written.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"`name` must be a non-empty str, got {name!r}.")
    _fs.check_plain_name(name, "`name` (the adapter's name, also its subdirectory)")
    if save_embedding_layers not in (True, False, "auto"):
        raise ConfigError(
            f"`save_embedding_layers`={save_embedding_layers!r}: use True, False or 'auto'."
        )
    key_map = key_map or stacked_key_map()
    tensors, entries, copies = _collect(params, name, key_map, dtype, save_embedding_layers)
    if not tensors:
        names = sorted({n for l in _walk(params)[0] if is_adapted(l.value) for n in l.value.names})
        raise AdapterNameError(
            f"`name`: no adapter named {name!r} to save; the adapters are {names}."
        )
    if config is None:
        config = config_from_specs(entries, copies)
    elif not isinstance(config, AdapterConfig):
        raise ConfigError(f"`config` must be a peftjax config, got {type(config).__name__}.")
    else:
        _check_config(config, entries)
    out = Path(path) if name == "default" else Path(path) / name
    d = config.to_dict()
    d["inference_mode"] = True  # as PEFT's save_pretrained
    text = json.dumps(d, indent=2, sort_keys=True)
    meta = {"format": "pt", DIGEST_KEY: config_digest(json.loads(text))}
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
    if os.path.lexists(out) and not out.is_dir():
        raise FormatError(f"`{out}` exists and is not a directory; cannot save an adapter there.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FormatError(f"cannot create adapter directory `{out}`: {e.strerror or e}.") from None
    _commit(
        out,
        [
            (WEIGHTS_NAME, _safetensors_chunks(specs, arrays.__getitem__, meta)),
            (CONFIG_NAME, [text.encode()]),
        ],
    )
    return out


# ---------------------------------------------------------------------------------- read


def _adapter_dir(path: str | os.PathLike, name: str = "default") -> Path:
    _fs.check_plain_name(name, "`name` (the adapter's name, also its subdirectory)")
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    if not p.exists():
        raise FormatError(f"adapter directory `{p}` does not exist.")
    if not p.is_dir():
        raise FormatError(f"`{p}` is not a directory; point at a PEFT adapter directory.")
    if (
        not os.path.lexists(p / CONFIG_NAME)
        and name != "default"
        and os.path.lexists(p / name / CONFIG_NAME)
    ):
        p = p / name
    return p


def _read_config_dict(d: Path) -> dict:
    f = d / CONFIG_NAME
    if not os.path.lexists(f):
        raise FormatError(f"`{d}` has no `{CONFIG_NAME}`; is it an HF PEFT adapter directory?")
    data = _fs.read_regular_file(f, "adapter config", max_bytes=_fs.MAX_JSON_BYTES)
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"`{f}` is not valid JSON: {e}.") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"`{f}` does not hold a JSON object.")
    pt = cfg.get("peft_type")
    if not isinstance(pt, str) or pt.upper() not in PEFT_TYPES:
        raise FormatError(
            f"`{f}`: peft_type {pt!r} is not supported; peftjax reads {sorted(PEFT_TYPES)}."
        )
    return cfg


def _read_weights(d: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    f = d / WEIGHTS_NAME
    if not os.path.lexists(f):
        pickles = [n for n in PICKLE_NAMES if os.path.lexists(d / n)]
        if pickles:
            raise FormatError(
                f"`{d}` holds `{pickles[0]}` but no `{WEIGHTS_NAME}`: peftjax never loads pickle "
                'files (they can run code). Convert it once with torch: `python -c "import torch; '
                "from safetensors.torch import save_file; "
                f"save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_NAME}', "
                "metadata={'format': 'pt'})\"` to safetensors."
            )
        raise FormatError(f"`{d}` has no `{WEIGHTS_NAME}`.")
    return read_safetensors(f)


def _check_float(files: _Files) -> None:
    """Adapter files hold floating-point weights only (an integer tensor would be cast)."""
    for k, v in sorted(files.tensors.items()):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise FormatError(
                f"`{files.dir / WEIGHTS_NAME}`: tensor `{k}` has dtype {v.dtype}; adapter "
                "weights must be floating point."
            )


def read_adapter(
    path: str | os.PathLike, name: str = "default"
) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a PEFT adapter directory, tensors as stored (torch layout, full
    PEFT keys). Raises `FormatError` for unreadable or non-float files, an unknown
    ``peft_type`` or a config that does not match the weights, and `ConfigError` for config
    fields peftjax does not support."""
    files = _read_dir(_adapter_dir(path, name))
    _check_float(files)
    return files.config, files.tensors


def embedding_base_keys(tensors: Mapping[str, Any], peft_type: str) -> dict[str, str]:
    """The base-layer weights an adapter carries (PEFT's ``save_embedding_layers``), as
    ``{model checkpoint key: adapter key}``: ``base_model.model.model.embed_tokens.base_layer.
    weight`` is ``{"model.embed_tokens.weight": "base_model.model.model.embed_tokens.base_layer.
    weight"}``. A merge must use these instead of the model checkpoint's own weights.

    >>> embedding_base_keys({"base_model.model.lm_head.base_layer.weight": None}, "LORA")
    {'lm_head.weight': 'base_model.model.lm_head.base_layer.weight'}
    """
    out = {}
    for k in sorted(tensors):
        kind, mod, param = _split_key(k, str(peft_type).upper())
        if kind == "base":
            out[f"{mod}.{param}"] = k
    return out


def inspect_adapter(path: str | os.PathLike, name: str = "default") -> dict[str, Any]:
    """A summary of a PEFT adapter directory (for the CLI): method, targets, ranks, sizes.

    ``embedding_layers``: modules whose base weights the adapter carries (PEFT's
    ``save_embedding_layers``, see `embedding_base_keys`); ``modules_to_save``: whole-module
    copies."""
    files = _read_dir(_adapter_dir(path, name))
    d, raw, config, tensors = files.dir, files.raw, files.config, files.tensors
    pt = raw["peft_type"].upper()
    targets: set[str] = set()
    saved: set[str] = set()
    embedding: set[str] = set()
    for k in tensors:
        kind, mod, _ = _split_key(k, pt)
        if kind in ("adapter", "ln"):
            targets.add(mod)
        elif kind == "base":
            embedding.add(mod)
        else:
            saved.add(mod)
    method = config.method
    if isinstance(config, LoraConfig) and config.use_dora:
        method = "dora"
    ranks = {}
    if isinstance(config, (LoraConfig, LoHaConfig, LoKrConfig)):
        ranks = {t: _module_r_alpha(config, t)[0] for t in sorted(targets)}
    dtypes = sorted({str(v.dtype) for v in tensors.values()})
    return {
        "path": str(d),
        "peft_type": pt,
        "method": method,
        "targets": sorted(targets),
        "modules_to_save": sorted(saved),
        "embedding_layers": sorted(embedding),
        "ranks": ranks,
        "n_tensors": len(tensors),
        "n_params": int(sum(v.size for v in tensors.values())),
        "dtype": ",".join(dtypes),
        "file_size": os.stat(d / WEIGHTS_NAME).st_size,
        "config": config.to_dict(),
    }


# ---------------------------------------------------------------------------------- load


def _reverse_map(params, key_map: KeyMap, layouts: LayoutSpec) -> dict[str, tuple[str, int | None]]:
    """``{PEFT module path: (module path, layer)}`` over every module of ``params``."""
    leaves, _ = _walk(params)
    out: dict[str, tuple[str, int | None]] = {}
    for mod, group in _modules(leaves).items():
        w = _weight_leaf(group)
        n = 0
        if w is not None:
            try:
                lay = resolve_layout(layouts, mod, w.name, w.base)
                n = math.prod(lay.stack_shape(tuple(w.base.shape))) if lay.stack else 0
            except UnsupportedModuleError:
                n = 0
        for i in range(n) if n else [None]:
            try:
                out.setdefault(_map(key_map, mod, i), (mod, i))
            except FormatError:
                break
    return out


def _check_targets_present(d: Path, config, params, key_map, layouts, present: set[str]):
    """``strict``: every module of ``params`` that the file's config targets (PEFT's matching
    on the PEFT module paths, as `inject` would select) must have weights in the file."""
    if config.target_modules is None:
        return
    leaves, _ = _walk(params)
    items: list[tuple[str, str, int]] = []  # (PEFT path, weight leaf name, matrix ndim)
    where: dict[str, str] = {}
    for mod, group in _modules(leaves).items():
        w = _weight_leaf(group)
        if w is None and config.method != "ln_tuning":
            continue
        n, ndim = 0, len(getattr(w.base, "shape", ())) if w is not None else 0
        if w is not None:
            try:
                lay = resolve_layout(layouts, mod, w.name, w.base)
                if lay.stack:
                    n = math.prod(lay.stack_shape(tuple(w.base.shape)))
                    ndim -= lay.stack
            except UnsupportedModuleError:
                pass
        for i in range(n) if n else [None]:
            try:
                pm = _map(key_map, mod, i)
            except FormatError:
                break
            items.append((pm, w.name if w is not None else "", ndim))
            where[pm] = mod if i is None else f"{mod} [layer {i}]"
    keys = [pm for pm, _, _ in items if pm]
    if not keys:
        return
    targets = config.target_modules
    linear = None
    if P.is_all_linear(targets):
        linear = P.select_all_linear(items, task_type=config.task_type)
    mts = config.modules_to_save
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save = P.select_modules_to_save(keys, mts) if mts else []
            chosen = P.select_modules(
                keys,
                target_modules=targets,
                exclude_modules=config.exclude_modules,
                modules_to_save=save,
                linear_modules=linear,
                forbid_with_str_target=False,
            )
    except PeftJaxError:
        return  # the config targets nothing here: the file's keys decide (checked elsewhere)
    ltt = getattr(config, "layers_to_transform", None)
    if ltt is not None and not isinstance(targets, str):
        eff = set(linear) if linear is not None else targets
        chosen = [
            k
            for k in chosen
            if P.matches_target(
                k, eff, layers_to_transform=ltt, layers_pattern=config.layers_pattern
            )
        ]
    lacking = [where[k] for k in chosen if k not in present]
    if lacking:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` has no weights for {len(lacking)} module(s) that "
            f"`{d / CONFIG_NAME}` targets in `params`: {lacking[:20]}; pass `strict=False` to "
            "load the others (or `key_map=` if the model names them differently)."
        )


def _is_ff(peft_path: str, ff) -> bool:
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, peft_path) is not None
    return any(peft_path.endswith(n) for n in ff)


def _exact(paths) -> str:
    return "|".join(re.escape(p) for p in sorted(paths, key=lambda p: (-len(p), p)))


def _pattern(values: dict[str, Any]) -> dict[str, Any]:
    """An exact-path rank/alpha pattern (longest paths first: the first match wins)."""
    order = sorted(values, key=lambda p: (-p.count("."), -len(p), p))
    return {re.escape(p): values[p] for p in order}


def load_pretrained(
    params,
    path: str | os.PathLike,
    name: str = "default",
    *,
    key_map: KeyMap | None = None,
    layouts: LayoutSpec = None,
    dtype=jnp.float32,
    strict: bool = True,
    activate: bool | None = None,
    is_trainable: bool = True,
):
    """``params`` with adapter ``name`` injected from an HF PEFT adapter directory.

    The directory is ``path`` itself (or ``path/<name>`` when ``path`` has no config and that
    exists, PEFT's layout for non-default adapters). The config comes from
    ``adapter_config.json``; the adapted modules are exactly those present in
    ``adapter_model.safetensors``, each PEFT module path mapped to a module of ``params`` by
    inverting ``key_map`` (default `stacked_key_map()`: the PEFT path minus
    ``base_model.model.`` is the module path; stacked weights take ``...layers.<i>...``).

    Args:
      params: the base tree (never modified).
      path: the adapter directory.
      name: the name the adapter gets in ``params``.
      key_map: ``(module_path[, layer]) -> PEFT module path``, the same one `save_pretrained` uses.
      layouts: as `inject` (stacked and DenseGeneral weights).
      dtype: dtype of the adapter arrays (float32, as PEFT).
      strict: raise when the file has keys that match no module or lacks a targeted array.
      activate: as `inject` (default: active when it is the first adapter).
      is_trainable: PEFT's ``PeftModel.from_pretrained(..., is_trainable=)``: ``False`` loads the
        adapter frozen (0 trainable parameters, see `pj.set_trainable`). The default is ``True``,
        unlike PEFT's, so that "load, then keep training" works as written; the files' own
        ``inference_mode: true`` (which every PEFT save writes) does not freeze it.

    Raises:
      FormatError: missing, truncated or pickle-only files, unknown ``peft_type``, keys that match
        no module, missing arrays.
      ConfigError: config fields peftjax does not support.
      ShapeError: a tensor whose shape does not fit its module (names key, expected, found).
    """
    key_map = key_map or stacked_key_map()
    d = _adapter_dir(path, name)
    files = _read_dir(d)
    _check_float(files)
    d, config, tensors = files.dir, files.config, files.tensors
    pt = config.peft_type
    rev = _reverse_map(params, key_map, layouts)

    adapter: dict[str, dict[int | None, dict[str, str]]] = {}  # module -> layer -> suffix -> key
    leaf_keys: dict[tuple[str, str, str], str] = {}  # (kind, module, torch param) -> key
    peft_of: dict[tuple[str, int | None], str] = {}
    present: set[str] = set()  # PEFT module paths the file has adapter weights for
    unmatched = []
    for k in sorted(tensors):
        kind, pm, suffix = _split_key(k, pt)
        hit = rev.get(pm)
        if hit is None or (kind == "copy" and not getattr(config, "modules_to_save", None)):
            unmatched.append(k)
            continue
        mod, layer = hit
        if kind in ("adapter", "ln"):
            present.add(pm)
        if kind == "adapter":
            adapter.setdefault(mod, {}).setdefault(layer, {})[suffix] = k
            peft_of[(mod, layer)] = pm
        elif layer is not None:
            unmatched.append(k)
        else:
            leaf_keys[(kind, mod, suffix)] = k
            if kind == "ln":
                adapter.setdefault(mod, {})
    if unmatched and strict:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}`: {len(unmatched)} key(s) match no module of `params` "
            f"(module paths look like {sorted(set(m for m, _ in rev.values()))[:5]}; pass "
            "`key_map=` if the model names them differently, `layouts=` for stacked layers): "
            f"{unmatched[:20]}"
        )
    if not adapter:
        raise FormatError(f"`{d / WEIGHTS_NAME}` holds no {pt} adapter weights.")
    if strict:
        _check_targets_present(d, config, params, key_map, layouts, present)

    # The config to inject: the file's, narrowed to exactly the modules present.
    kw: dict[str, Any] = dict(target_modules=f"(?:{_exact(adapter)})", exclude_modules=None)
    if hasattr(config, "layers_to_transform"):
        kw.update(layers_to_transform=None, layers_pattern=None)
    mts = sorted({m for (kind, m, _) in leaf_keys if kind == "copy"})
    kw["modules_to_save"] = mts or None
    scales: dict[str, dict[int | None, float]] = {}
    if isinstance(config, (LoraConfig, LoHaConfig, LoKrConfig)):
        ranks, alphas = {}, {}
        for mod, layers in adapter.items():
            ra = {i: _module_r_alpha(config, peft_of[(mod, i)]) for i in layers}
            if len({r for r, _ in ra.values()}) > 1:
                per_layer = {peft_of[(mod, i)]: r for i, (r, _) in ra.items()}
                raise ConfigError(
                    f"module `{mod}` is stacked but its layers have different ranks {per_layer}; "
                    "one stacked adapter has one rank."
                )
            ranks[mod] = next(iter(ra.values()))[0]
            alphas[mod] = next(iter(ra.values()))[1]
            scales[mod] = {i: config.scaling(r, a) for i, (r, a) in ra.items()}
        alpha_field = "lora_alpha" if isinstance(config, LoraConfig) else "alpha"
        for field, pat, vals in (
            ("r", "rank_pattern", ranks),
            (alpha_field, "alpha_pattern", alphas),
        ):
            if len(set(vals.values())) == 1:
                kw[field], kw[pat] = next(iter(vals.values())), {}
            else:
                kw[pat] = _pattern(vals)
    else:
        scales = {mod: {i: 1.0 for i in layers} for mod, layers in adapter.items()}
    if isinstance(config, IA3Config):
        ff = [
            m
            for m in adapter
            if any(_is_ff(peft_of[(m, i)], config.feedforward_modules) for i in adapter[m])
        ]
        kw["feedforward_modules"] = f"(?:{_exact(ff)})" if ff else None
    inner = dataclasses.replace(config, **kw)
    new, concrete = _inject_shapes(
        params,
        inner,
        name=name,
        layouts=layouts,
        dtype=dtype,
        activate=activate,
        trainable=bool(is_trainable),
    )

    used: set[str] = set()
    missing: list[str] = []
    orig = _walk(params)[0]
    leaves, treedef = _walk(new)
    out = []
    for j, leaf in enumerate(leaves):
        node = leaf.value
        if not concrete:
            # the abstract tree gets the real leaves, bases and other adapters' arrays back
            old = orig[j].value
            if is_adapted(node):
                base = old.base if is_adapted(old) else old
                node = node.replace(base=base, arrays=dict(old.arrays) if is_adapted(old) else {})
            else:
                node = old
        if is_adapted(node) and name in node.names:
            spec = node.spec(name)
            init = _Init(spec, node.base, dtype, j, node.arrays.get(name) if concrete else None)
            if isinstance(spec, CopySpec):
                kind = "ln" if spec.kind == "ln_tuning" else "copy"
                tn = _torch_name(leaf.name)
                k = leaf_keys.get((kind, leaf.module, tn))
                base = node.base
                if k is None:
                    mid = f"{_LN}." if kind == "ln" else ""
                    missing.append(f"{leaf.module}.{mid}{tn}")
                    arrays = init()
                else:
                    rule = _leaf_rule(leaf.name, tuple(base.shape))
                    val = _from_file(k, tensors[k], rule, tuple(base.shape))
                    arrays = {"weight": jnp.asarray(val, base.dtype)}
                    used.add(k)
            elif isinstance(spec, IA3BiasSpec):
                arrays = {}
            else:
                spec, arrays = _fill(
                    spec,
                    init,
                    adapter.get(leaf.module, {}),
                    scales.get(leaf.module),
                    tensors,
                    used,
                    missing,
                    leaf.module,
                    dtype,
                )
                node = node.replace(
                    specs=tuple((n, spec if n == name else s) for n, s in node.specs)
                )
            node = node.replace(arrays={**node.arrays, name: arrays})
        k = leaf_keys.get(("base", leaf.module, _torch_name(leaf.name)))
        if k is not None:
            base = node.base if is_adapted(node) else node
            rule = _leaf_rule(leaf.name, tuple(base.shape))
            val = jnp.asarray(_from_file(k, tensors[k], rule, tuple(base.shape)), base.dtype)
            if is_adapted(node):
                node = node.replace(base=val)
                if name in node.names and not node.spec(name).carries_base:
                    # remember that this adapter brings the base weights (save_pretrained)
                    carried = dataclasses.replace(node.spec(name), carries_base=True)
                    node = node.replace(
                        specs=tuple((n, carried if n == name else s) for n, s in node.specs)
                    )
            else:
                node = val
            used.add(k)
        out.append(node)
    if strict and missing:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` lacks {len(missing)} array(s) the config implies: {missing[:20]}"
        )
    left = sorted(set(tensors) - used - set(unmatched))
    if strict and left:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}`: {len(left)} key(s) do not fit the {pt} config "
            f"({type(config).__name__}): {left[:20]}"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _inject_shapes(params, config, **kw):
    """`inject` without computing any initial value (``jax.eval_shape``): the adapter arrays
    come from the file. Returns ``(tree, concrete)``; falls back to a real `inject` (``concrete``
    True) for trees that ``eval_shape`` cannot take (non-array leaves)."""
    fn = lambda p: inject(p, config, key=jax.random.key(0), **kw)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(params)
    if all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
        return jax.eval_shape(fn, params), False
    return fn(params), True


class _Init:
    """The arrays `inject` would give one node, computed only if some are not in the file."""

    def __init__(self, spec: Spec, base, dtype, index: int, have=None):
        self.spec, self.base, self.dtype, self.index, self.have = spec, base, dtype, index, have

    def __call__(self) -> dict:
        if self.have is None:
            key = jax.random.fold_in(jax.random.key(0), self.index)
            self.have = self.spec.init(key, self.base, self.dtype)
        return dict(self.have)


def _from_file(key: str, t: np.ndarray, rule: _Rule, shape: tuple[int, ...]) -> np.ndarray:
    want = rule.torch_shape(tuple(shape))
    if tuple(t.shape) != tuple(want):
        raise ShapeError(
            f"tensor `{key}` has shape {list(t.shape)}; the module expects {list(want)} "
            "(torch layout)."
        )
    return rule.from_torch(t, tuple(shape))


def _fill(spec: Spec, init: _Init, layers: dict, scales, tensors, used, missing, module, dtype):
    """One node's arrays of the loaded adapter, from the file, and its spec. A stacked weight
    gets exactly the layers the file has: `Spec.layers` lists them when some are absent (their
    arrays compact, their scaling ``0``). A layer the file has but that lacks an array
    (``strict=False``) takes `inject`'s initial value for it."""
    rules = _rules(spec)
    stack = spec.layout.stack_shape(spec.shape)
    n = math.prod(stack) if stack else 1
    idx = [None] if not stack else [i for i in range(n) if i in layers]
    if stack and len(idx) < n:
        spec = dataclasses.replace(
            spec,
            scaling=tuple(s if i in layers else 0.0 for i, s in enumerate(spec.scaling)),
            layers=tuple(idx),
        )
    base = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
    shapes = jax.eval_shape(lambda b: spec.init(jax.random.key(0), b, dtype), base)
    arrays = {}
    for arr_name, (suffix, rule) in rules.items():
        shape = tuple(shapes[arr_name].shape)
        layer_shape = shape[len(stack) :] if not spec.compact else shape[1:]
        parts: list[np.ndarray | None] = []
        for i in idx:
            k = layers.get(i, {}).get(suffix)
            if k is None:
                if i in layers:
                    missing.append(f"{module}{'' if i is None else f'[layer {i}]'}.{suffix}")
                parts.append(None)
                continue
            parts.append(_from_file(k, tensors[k], rule, layer_shape))
            used.add(k)
        if any(p is None for p in parts):  # `inject`'s values (a full stack: its layer i)
            fallback = np.asarray(init()[arr_name]).reshape((n, *layer_shape))
            parts = [fallback[i or 0] if p is None else p for i, p in zip(idx, parts)]
        stacked = np.stack(parts).reshape(shape) if stack else parts[0]
        arrays[arr_name] = jnp.asarray(stacked, dtype)
    if scales is not None:
        every = range(n) if stack else [None]
        new = tuple(float(scales.get(i, 0.0)) if i in layers else 0.0 for i in every)
        if new != tuple(spec.scaling):
            spec = dataclasses.replace(spec, scaling=new)
    return spec, arrays
