"""The safetensors format, read and written without torch: an 8-byte little-endian header
length, a JSON header, the raw little-endian bytes. Generic: nothing here knows about adapters.

The reader refuses what the reference implementation (safetensors 0.8) refuses: a header over
100,000,000 bytes or past the file's end, non-UTF-8 or non-JSON headers, a ``__metadata__`` that
is not a str -> str map, unknown dtypes, shapes that are not non-negative integers, offsets that
do not tile the data exactly (gaps, overlaps, trailing bytes), sizes that do not match
``prod(shape) * itemsize`` (`parse_header` lists the rules). The header is checked against the
file size before any data is read, and only regular files are opened (`peftjax._fs`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from . import _fs
from .errors import FormatError

__all__ = [
    "DTYPES",
    "MAX_HEADER",
    "encode_chunks",
    "parse_header",
    "read_safetensors",
    "read_safetensors_header",
]

DTYPES: dict[str, Any] = {
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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: Every dtype name the safetensors format knows, with its size in bits (the sub-byte ones are
#: valid in a file but have no numpy dtype here: reading such a tensor raises `FormatError`).
_DTYPE_BITS: dict[str, int] = {
    **{k: v.itemsize * 8 for k, v in DTYPES.items()},
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
#: The safetensors reference implementation's limit on the JSON header.
MAX_HEADER = 100_000_000
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


def parse_header(
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


def open_checked(path: Path, what: str, roots=None):
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


def read_exactly(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{what}: `{path}` shrank while being read; refusing it.")
    return data


def header_of(f, size: int, path: Path, what: str):
    """Read and validate the header of an open safetensors file of ``size`` bytes."""

    def bad(why: str) -> FormatError:
        return FormatError(f"{what}: `{path}` is not a valid safetensors file ({why}).")

    if size < 8:
        raise bad(f"only {size} bytes; is it truncated?")
    (n,) = struct.unpack("<Q", read_exactly(f, 8, path, what))
    if n > MAX_HEADER or n > size - 8:
        raise bad(
            f"header length {n} in a file of {size} bytes (at most {MAX_HEADER:,d} and the "
            "file size); is it truncated?"
        )
    raw = read_exactly(f, n, path, what)
    try:
        entries, meta = parse_header(raw, size - 8 - n)
    except ValueError as e:
        raise bad(str(e)) from None
    return n, entries, meta


def encode_chunks(specs, produce, metadata):
    """The bytes of a safetensors file, in pieces (see `write_safetensors_streaming`)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    keys = sorted(specs)
    for key in keys:
        shape, dtype = specs[key]
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise FormatError(f"tensor `{key}`: dtype {dtype} cannot be stored in safetensors.")
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[dtype.newbyteorder("=")],
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
    f, size = open_checked(path, what, roots)
    with f:
        _, entries, _ = header_of(f, size, path, what)
    return {k: (shape, np_dtype(k, dt, path)) for k, (dt, shape, _, _) in entries.items()}


def np_dtype(key: str, dt: str, path: Path) -> np.dtype:
    if dt not in DTYPES:
        raise FormatError(
            f"`{path}`: tensor `{key}` has dtype {dt}, a sub-byte type peftjax cannot read."
        )
    return DTYPES[dt]


def read_safetensors(
    path: str | os.PathLike, *, roots=None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; `FormatError` naming the file if it is
    missing, not a regular file (device, FIFO, a link out of its directory), truncated or
    malformed. Accepts exactly the files the safetensors reference implementation accepts (see
    `parse_header`); the header is checked against the file size before any data is read.
    Tensors are read-only views of the file's bytes (one copy of the file in memory)."""
    path = Path(path)
    what = "safetensors file"
    f, size = open_checked(path, what, roots)
    with f:
        n, entries, meta = header_of(f, size, path, what)
        dtypes = {k: np_dtype(k, dt, path) for k, (dt, _, _, _) in entries.items()}
        data = read_exactly(f, size - 8 - n, path, what)
        if f.read(1):
            raise FormatError(f"{what}: `{path}` grew while being read; refusing it.")
    buf = memoryview(data)
    out: dict[str, np.ndarray] = {}
    for key, (_, shape, start, end) in entries.items():
        dt = dtypes[key]
        le = dt.newbyteorder("<")
        out[key] = np.frombuffer(buf[start:end], le).astype(dt, copy=False).reshape(shape)
    return out, meta
