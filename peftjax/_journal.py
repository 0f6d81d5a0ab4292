"""Crash-safe adapter directories: the journal, the lock and the temp files of a save.

Crash safety of `save_pretrained`. An adapter is two files that must change together, which
no single rename can do, so a save is journalled:

1. under an exclusive ``flock`` on the adapter directory, finish or undo any earlier
   interrupted save (`recover`);
2. write the new weights and config to temp files ``.peftjax-tmp-*`` in the directory, fsync;
3. write the journal ``.peftjax-save.json`` (``{"renames": [[temp, final], ...]}``) to a temp
   file, fsync, and rename it into place: **the commit point**;
4. rename each temp file over its final name, fsync the directory, delete the journal, fsync.

Every peftjax reader and writer of the directory (`load_pretrained`, `read_adapter`,
`inspect_adapter`, `save_pretrained`) first recovers, under the same exclusive lock: a journal
means the save committed, so the renames whose temp file still exists are redone and the
journal deleted; peftjax temp files without a journal belong to a save that never committed
and are deleted. So a kill at any point leaves, as peftjax reads it, the complete old adapter or
the complete new one, and no temp files accumulate. Readers hold a shared lock while reading.

Tears made by other tools (a config copied over from another adapter) are caught by a digest:
the weights' safetensors metadata holds ``peftjax.config_sha256``, the SHA-256 of the config's
math (its parsed fields minus bookkeeping such as ``base_model_name_or_path``); a loader refuses
a pair whose digest disagrees. PEFT ignores unknown metadata, so the files stay PEFT's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import _fs
from .errors import FormatError

#: The two files of an adapter directory (PEFT's names).
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

try:  # POSIX; elsewhere saves are journalled but not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

JOURNAL_NAME = ".peftjax-save.json"
DIGEST_KEY = "peftjax.config_sha256"
TMP_PREFIX = ".peftjax-tmp-"
#: Config fields that do not change what an adapter computes (a digest ignores them).
BOOKKEEPING = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
    }
)


def is_temp(name: str) -> bool:
    """peftjax's own temp files in an adapter directory (this version's and the older
    ``.<final name>.<random>.tmp`` of `atomic_write`)."""
    if name.startswith(TMP_PREFIX):
        return True
    return name.endswith(".tmp") and name.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}."))


@contextlib.contextmanager
def dir_lock(d: Path, exclusive: bool):
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


def fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass


def needs_recovery(d: Path) -> bool:
    try:
        return any(n == JOURNAL_NAME or is_temp(n) for n in os.listdir(d))
    except OSError:
        return False


def journal_pairs(j: Path) -> list[tuple[str, str]]:
    raw = _fs.read_regular_file(j, "save journal", max_bytes=1 << 16)
    try:
        pairs = json.loads(raw)["renames"]
        out = []
        for tmp, final in pairs:
            _fs.check_plain_name(tmp, f"`{j}`")
            if not tmp.startswith(TMP_PREFIX) or final not in (WEIGHTS_NAME, CONFIG_NAME):
                raise ValueError(f"unexpected rename {tmp!r} -> {final!r}")
            out.append((tmp, final))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(
            f"`{j}` is not a peftjax save journal ({e}); remove it if no save is running."
        ) from None


def recover(d: Path, fd: int) -> None:
    """Finish (journal present) or undo (temp files only) an interrupted save; needs the
    exclusive lock."""
    j = d / JOURNAL_NAME
    changed = False
    if os.path.lexists(j):
        for tmp, final in journal_pairs(j):
            if os.path.lexists(d / tmp):
                os.replace(d / tmp, d / final)
        fsync_dir(fd)
        os.unlink(j)
        changed = True
    for n in os.listdir(d):
        if is_temp(n):
            try:
                os.unlink(d / n)
                changed = True
            except FileNotFoundError:
                pass
    if changed:
        fsync_dir(fd)


def write_temp(d: Path, final: str, chunks) -> str:
    """Write ``chunks`` to a new peftjax temp file in ``d`` (fsynced); returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="." + final, dir=d)
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


def commit(d: Path, files: list[tuple[str, Any]]) -> None:
    """Replace ``files`` (``[(final name, chunks)]``) in ``d`` as one journalled change."""
    with dir_lock(d, exclusive=True) as fd:
        recover(d, fd)
        pairs: list[tuple[str, str]] = []
        try:
            for final, chunks in files:
                pairs.append((write_temp(d, final, chunks), final))
            journal = json.dumps({"renames": pairs}).encode()
            jtmp = write_temp(d, "journal", [journal])
        except BaseException:
            for tmp, _ in pairs:
                if os.path.lexists(d / tmp):
                    os.unlink(d / tmp)
            raise
        os.replace(d / jtmp, d / JOURNAL_NAME)  # the commit point
        fsync_dir(fd)
        for tmp, final in pairs:
            os.replace(d / tmp, d / final)
        fsync_dir(fd)
        os.unlink(d / JOURNAL_NAME)
        fsync_dir(fd)


def atomic_write(path: Path, chunks) -> None:
    """Write one file atomically: a fsynced peftjax temp file renamed over ``path``."""
    tmp = path.parent / write_temp(path.parent, path.name, chunks)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
