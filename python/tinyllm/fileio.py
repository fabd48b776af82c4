"""Atomic file writes: a crash leaves either the old file or the complete new one, never half.

Temp files and directories are named <name>.<pid>.<random>.tmp beside their target. A writer that is
killed cannot remove its own, so the next write of the same target removes those whose process is
gone (and untagged ones from older releases once they are an hour old). A full disk is one clear
FileError ("no space left on device writing X; the previous file is intact"), with the temp removed.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import time

from .errors import FileError

UNTAGGED_TEMP_AGE_S = 3600  # a temp without a pid in its name is removed once it is this old


def _temp_prefix(path: str) -> str:
    return f"{os.path.basename(path)}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path) -> list[str]:
    """Remove the temp files and directories that killed writers of path left beside it; returns them."""
    path = os.path.abspath(os.fspath(path))
    base = os.path.basename(path)
    removed = []
    for temp in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), glob.escape(base) + ".*.tmp")):
        tag = os.path.basename(temp)[len(base) + 1:].split(".")[0]
        try:
            if tag.isdigit():
                if int(tag) == os.getpid() or _process_alive(int(tag)):
                    continue
            elif time.time() - os.path.getmtime(temp) < UNTAGGED_TEMP_AGE_S:
                continue
            if os.path.isdir(temp) and not os.path.islink(temp):
                shutil.rmtree(temp)
            else:
                os.unlink(temp)
            removed.append(temp)
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def _fsync_dir(directory: str):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _no_space(e: BaseException, path: str, what: str) -> FileError | None:
    """The one-line error for a full disk (or quota), or None for any other error."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileError(f"no space left on device writing {path}; {what}")
    return None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside path for a writer that wants a file name; on clean exit fsync it and
    rename it over path (and fsync the directory). On error the temp file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _no_space(e, path, "the previous file is intact" if os.path.exists(path) else "nothing was written")
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file beside path; on clean exit fsync it and rename it over path."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(path, replaceable=lambda existing: True):
    """Yield a temp directory beside path to fill; on clean exit fsync its files and rename it to path. A
    directory already at path is replaced as a whole (never mixed with the new files), and only when
    replaceable(path) says it may be. On error the temp directory is removed and path is untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(path) and not (os.path.isdir(path) and replaceable(path)):
        raise FileError(f"{path} exists and is not a directory this writer may replace; choose another name")
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
            os.rename(path, os.path.join(old, "previous"))  # a crash from here on leaves it under old
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _no_space(e, path, "the previous directory is intact" if os.path.isdir(path) else "nothing was written")
        if full is not None:
            raise full from None
        raise
