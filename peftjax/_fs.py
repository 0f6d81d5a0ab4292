"""File-system rules shared by every peftjax reader and writer (loaders, checkpoints, the CLI).

The rules, as the README states them:

* **Regular files only.** A loader opens a file only after ``stat`` says it is a regular file:
  devices (``/dev/zero``), FIFOs, sockets and directories are refused before any byte is read,
  so nothing can block forever or stream without end.
* **Symlinks stay inside.** A symlink is followed only when its target resolves inside one of
  the *allowed roots*: the directory the caller named, or, for an HF hub cache snapshot
  (``.../models--org--name/snapshots/<rev>/``), that repository's ``blobs/`` folder, where the hub
  keeps the real bytes. Any other link is refused and named.
* **Names from files are plain names.** A file name read from a file (a shard name in
  ``model.safetensors.index.json``) or given as an adapter name must be a single path
  component: not empty, not ``.``/``..``, no ``/`` or ``\\``, no NUL, not absolute. It is then
  joined to the directory and must still resolve inside it.
* **Sizes are bounded.** A reader says how many bytes it expects at most (``max_bytes``); a
  larger file is refused before it is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import FormatError

__all__ = ["allowed_roots", "check_plain_name", "check_regular_file", "read_regular_file"]

#: JSON side files (configs, indexes) larger than this are refused unread.
MAX_JSON_BYTES = 64 * 1024 * 1024


def allowed_roots(directory: str | os.PathLike) -> tuple[Path, ...]:
    """The roots a link inside ``directory`` may point into: ``directory`` itself and, when it
    is an HF hub cache snapshot (``<repo>/snapshots/<rev>``), ``<repo>/blobs``."""
    d = Path(os.path.abspath(directory))
    roots = [d]
    try:
        real = d.resolve()
    except OSError:
        real = d
    if real != d:
        roots.append(real)
    for cand in {d, real}:
        if cand.parent.name == "snapshots":
            roots.append(cand.parent.parent / "blobs")
    return tuple(roots)


def _inside(p: Path, roots: Iterable[Path]) -> bool:
    for r in roots:
        try:
            rr = r.resolve()
        except OSError:
            continue
        if p == rr or rr in p.parents:
            return True
    return False


def check_plain_name(name, what: str) -> str:
    """``name`` if it is a single, plain path component; `FormatError` naming ``what`` if not."""
    if not isinstance(name, str):
        raise FormatError(
            f"{what}: expected a file name (str), got {type(name).__name__} {name!r}."
        )
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
        or (os.altsep is not None and os.altsep in name)
    )
    if bad:
        raise FormatError(
            f"{what}: {name!r} is not a plain file name (no directories, `..` or absolute paths "
            "are accepted from a file)."
        )
    return name


def check_regular_file(
    path: str | os.PathLike,
    what: str,
    *,
    roots: Iterable[Path] | None = None,
    max_bytes: int | None = None,
) -> os.stat_result:
    """Check that ``path`` is a regular file we may read; return its ``stat``.

    ``roots``: where a symlink may lead (default: `allowed_roots` of the file's directory).
    Raises `FormatError` naming ``what`` and the path for a missing file, a non-regular file
    (device, FIFO, socket, directory), a link leading outside ``roots`` or a file over
    ``max_bytes``.
    """
    p = Path(path)
    try:
        lst = os.lstat(p)
    except FileNotFoundError:
        raise FormatError(f"{what}: `{p}` does not exist.") from None
    except OSError as e:
        raise FormatError(f"{what}: cannot stat `{p}`: {e.strerror or e}.") from None
    if stat.S_ISLNK(lst.st_mode):
        roots = tuple(roots) if roots is not None else allowed_roots(p.parent)
        try:
            target = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise FormatError(f"{what}: `{p}` is a broken or looping symlink.") from None
        if not _inside(target, roots):
            raise FormatError(
                f"{what}: `{p}` is a symlink to `{target}`, outside {[str(r) for r in roots]}; "
                "peftjax follows links only inside the given directory (or an HF hub cache "
                "snapshot's blobs/)."
            )
    try:
        st = os.stat(p)
    except OSError as e:
        raise FormatError(f"{what}: cannot stat `{p}`: {e.strerror or e}.") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise FormatError(f"{what}: `{p}` is {kind}; peftjax reads regular files only.")
    if max_bytes is not None and st.st_size > max_bytes:
        raise FormatError(
            f"{what}: `{p}` is {st.st_size:,d} bytes, more than the {max_bytes:,d} expected."
        )
    return st


def read_regular_file(
    path: str | os.PathLike,
    what: str,
    *,
    roots: Iterable[Path] | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """The bytes of a regular file (see `check_regular_file`), read with ``O_NONBLOCK`` and a
    second ``fstat`` so that a file swapped for a FIFO or device after the check is refused too."""
    st = check_regular_file(path, what, roots=roots, max_bytes=max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FormatError(f"{what}: cannot open `{path}`: {e.strerror or e}.") from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise FormatError(f"{what}: `{path}` changed while being opened; refusing it.")
        limit = fst.st_size if max_bytes is None else min(fst.st_size, max_bytes)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{what}: `{path}` grew while being read; refusing it.")
    return data
