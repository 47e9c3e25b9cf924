"""Directories that appear whole or not at all: build under a temporary name, fsync, rename.

`rename(2)` of a directory within one filesystem is atomic on POSIX, so a reader sees either the
old directory or the new one, never a half-written one; fsync of the files and of the parent
directory makes that true after a power loss too (the data and the rename both reach the disk).
Temporary and trash names start with "." and carry the pid, so they never look like a result and
two processes never pick the same one. `seal` writes a marker listing the size and sha256 of every
file, last, so a reader can tell a whole directory from a damaged one (`check_sealed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lora_ppo.errors import UserError

TMP_TAG, TRASH_TAG = ".tmp-", ".trash-"


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, `root` itself last."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(root: Path, marker: str) -> None:
    """Write `root/marker`: {"files": {relative path: {"size", "sha256"}}} of every other file."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != marker)
    manifest = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files}
    (Path(root) / marker).write_text(json.dumps({"files": manifest}, indent=1))


def check_sealed(root: Path, marker: str, hint: str) -> None:
    """UserError naming the first file that is missing, truncated or changed since `seal`."""
    try:
        manifest = json.loads((Path(root) / marker).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{Path(root) / marker} is missing or unreadable; {hint}")
    for rel, meta in manifest.items():
        p = Path(root) / rel
        problem = ("is missing" if not p.is_file() else
                   f"is truncated ({p.stat().st_size} of {meta['size']} bytes)"
                   if p.stat().st_size != meta["size"] else
                   "is corrupt (sha256 differs from the one recorded when it was written)"
                   if sha256_file(p) != meta["sha256"] else None)
        if problem:
            raise UserError(f"file {p} {problem}; {hint}")


def remove_dir(path: Path) -> None:
    """Delete a directory tree; it first moves to a trash name, so a crash halfway through the
    delete never leaves a partly deleted tree under the original (complete-looking) name."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}{TRASH_TAG}{os.getpid()}")
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing whatever `dst` was.

    POSIX rename cannot replace a non-empty directory, so an existing `dst` moves to a trash
    name first; between the two renames `dst` is briefly absent, never half-written.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}{TRASH_TAG}{os.getpid()}")
        os.rename(dst, trash)
    os.rename(src, dst)
    fsync_path(dst.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def check_output_dir(out: Path, force: bool, flag: str = "--force") -> None:
    """Refuse an existing non-empty output directory unless `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} is not empty; choose another --out or pass "
                        f"{flag} to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on normal exit it becomes `out`.

    On an exception the temporary directory is deleted and `out` is left as it was, so a failed
    command leaves nothing half-written behind.
    """
    out = Path(out).expanduser().absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}{TMP_TAG}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
