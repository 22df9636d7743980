"""Writing files so that a kill at any moment leaves the old file or the complete new one, and
reading a user's file so that it cannot hang or flood memory.

Part of the bottom layer: standard library only. Every writer of a file that a later run
reads (checkpoints, index caches, shards, arrays, configs, reports) goes through here.
"""
import contextlib
import os
import re
import shutil
import stat
import time

MAX_FILE_BYTES = 64 * 2 ** 20     # a frame file larger than this is treated as unreadable


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_args):
    """Open a temp file beside `path` for writing; on leaving the block, flush, fsync and
    rename it over `path`: a kill at any moment leaves either the old file or the complete new
    one. On an error the temp file is removed and `path` is untouched. Every writer of a file
    that a later run reads (checkpoints, index caches, shards, arrays, configs) goes through
    here."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """A temporary folder beside `path` to fill; on leaving the block it is renamed to `path`,
    so a killed process leaves either no `path` or a complete one (the hidden temp folder is
    removed on an error here, or by remove_stale_temps after a kill)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder):
    """Remove what atomic_write and atomic_dir leave in `folder` when a process is killed
    mid-write. Only for a folder this process holds (a lock): a live writer's temp goes too."""
    for name in os.listdir(folder):
        if re.search(r"\.tmp\.\d+$", name):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def remove_orphaned_temps(folder, min_age_s=600):
    """Remove what a killed writer left in a folder other processes may be writing to (an
    output or cache folder without a lock): a temp whose writer is not running on this machine
    and that nothing has written for `min_age_s` seconds (a live writer on another node keeps
    its temp fresh). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = re.search(r"\.tmp\.(\d+)$", name)
        path = os.path.join(folder, name)
        if not match or _running(int(match[1])):
            continue
        try:
            if time.time() - os.lstat(path).st_mtime < min_age_s:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:               # someone else's live process
        return True
    return True


def copy_atomic(src, dst):
    """Copy the bytes of `src` to `dst` through atomic_write."""
    with atomic_write(dst) as f, open(src, "rb") as source:
        shutil.copyfileobj(source, f)


def link_atomic(src, dst):
    """Make `dst` a copy of `src` atomically; a hard link when the filesystem has them."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:                     # no hard links here: copy the bytes
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)


def what_it_is(mode):
    """A few words for a file that is not a regular file, from its st_mode."""
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode) else "not a regular file")


def open_regular(path, mode="rb"):
    """`path` opened for reading if it is a regular file (after links). Anything else raises
    ValueError saying what it is, without blocking on it: opening a FIFO would wait forever
    for a writer (and a stop signal handler that retries open() with it); OSError when it
    cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # a FIFO must not block the open
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file ({what_it_is(info.st_mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def read_file(path, limit=MAX_FILE_BYTES):
    """The bytes of a regular file of at most `limit` bytes. Anything else (a FIFO, which would
    block forever; a device such as /dev/zero behind a symlink, which never ends; a huge file)
    raises ValueError, which the datasets treat like any unreadable frame."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{size} bytes, more than the {limit} a frame may have")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"more than the {limit} bytes a frame may have")
    return data
