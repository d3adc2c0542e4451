"""Atomic exports: a repository is built and verified in a staging folder beside `--out` and moved
into place only when it passed. A failed, interrupted or killed export leaves `--out` as it was:
an existing repository byte for byte, a new `--out` never created.

The move is one rename: `rename(2)` for a new `--out`; for an existing one, Linux's
`renameat2(RENAME_EXCHANGE)` swaps the two folders atomically (a reader sees the old repository or
the new one, never a mix), then the old one, now in the staging path, is removed. Where the
filesystem cannot exchange (EINVAL: not every filesystem supports it), the old folder is renamed
aside first; a kill between the two renames then leaves the new repository in the staging path and
the old one beside it, both whole, and the message says where.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

STAGING_PREFIX = ".export-staging-"
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def staging_dir(out: Path) -> Path:
    """A new, empty folder beside `out` (same filesystem, so the final move is a rename); stale
    staging folders of dead exports of the same `out` are removed first."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{STAGING_PREFIX}"
    for stale in out.parent.glob(prefix + "*"):
        pid = stale.name.removeprefix(prefix).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    stage = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush the staged files before they become the repository (a crash after the rename must
    not leave empty files in a repository that looks complete)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(folder))


def publish(stage: Path, out: Path) -> None:
    """Move the verified `stage` to `out` (replacing an existing `out` atomically)."""
    out = out.absolute()
    _fsync_tree(stage)
    if not out.exists():
        os.rename(stage, out)
        _fsync_dir(out.parent)
        return
    if not out.is_dir():
        raise OSError(errno.ENOTDIR, f"--out {out} exists and is not a folder")
    try:
        _exchange(stage, out)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        aside = stage.with_name(stage.name + "-previous")
        os.rename(out, aside)
        os.rename(stage, out)
        stage = aside
    _fsync_dir(out.parent)
    shutil.rmtree(stage, ignore_errors=True)


def discard(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
