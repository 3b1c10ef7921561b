"""Crash-safe files and directories: write under a temporary name, fsync, rename.

A rename within one file system is atomic: a reader (or a process resuming after a crash)
sees either the old content under the final name or the complete new content, never a
half-written file. fsync of the file before the rename and of the directory after it makes
the new name survive a power cut as well as a killed process.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories themselves."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` writes the content to a temporary file next to `path`; it is then
    fsynced and renamed to `path` (replacing an old file atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would (writers may use 0600)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` durable and rename it to `final` (which must not
    exist): the rename is the commit."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory tree (if present)."""
    shutil.rmtree(path, ignore_errors=True)
