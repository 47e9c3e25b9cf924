"""Directories that appear whole or not at all: build under a temporary name, fsync, rename.

`rename(2)` of a directory within one filesystem is atomic on POSIX, so a reader sees either the
old directory or the new one, never a half-written one; fsync of the files and of the parent
directory makes that true after a power loss too (the data and the rename both reach the disk).
Temporary and trash names start with "." and carry the host and pid (`.out.tmp-<host>-<pid>`), so
they never look like a result and two processes never pick the same one; a process killed with
SIGKILL cannot remove its own, so `atomic_output_dir` removes those of dead processes on this host
beside the same output (`remove_stale`). `seal` writes a marker listing the size and sha256 of every
file, last, so a reader can tell a whole directory from a damaged one (`check_sealed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from lora_ppo.errors import UserError

TMP_TAG, TRASH_TAG = ".tmp-", ".trash-"


def owner_tag() -> str:
    """`<host>-<pid>`: who owns a temporary or trash name. The host matters on a shared
    filesystem, where a pid that is dead here may be alive on another machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (kill(2))
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Delete `.<out>.tmp-<host>-<pid>` and `.<out>.trash-<host>-<pid>` beside `out` left by a
    dead process on this host (a SIGKILL or a power loss skips every `finally`); returns them.
    Names of live processes, of other hosts, or in another format are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for tag in (TMP_TAG, TRASH_TAG):
        prefix = f".{out.name}{tag}"
        for p in out.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            owner, _, pid = p.name[len(prefix):].rpartition("-")
            if owner == host and pid.isdigit() and int(pid) != os.getpid() \
                    and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (what `kill`, `timeout` and schedulers send first) into SystemExit(143)
    while the block runs, so its `finally` clauses remove temporary output; the previous
    handler is restored after. Only the main thread can set handlers: elsewhere, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a temp file beside it (named after this process,
    so concurrent writers never share one), fsynced, renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)


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
        size = p.stat().st_size if p.is_file() else None
        problem = ("is missing" if size is None else
                   f"is truncated ({size} of {meta['size']} bytes)" if size < meta["size"] else
                   f"has changed since it was written ({size} bytes, {meta['size']} recorded)"
                   if size > meta["size"] else
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
    trash = path.with_name(f".{path.name}{TRASH_TAG}{owner_tag()}")
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
        trash = dst.with_name(f".{dst.name}{TRASH_TAG}{owner_tag()}")
        os.rename(dst, trash)
    os.rename(src, dst)
    fsync_path(dst.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def check_output_dir(out: Path, force: bool, flag: str = "--force") -> None:
    """Refuse an existing non-empty output directory unless `force`, an output under a regular
    file, and one whose nearest existing parent cannot be written to."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # Path.exists() is False under a file (ENOTDIR): walk up to it
        raise UserError(f"output {out} is under {parent}, which is a file, not a directory; "
                        "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {out}: cannot write to {parent} (permission denied); choose "
                        "another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} is not empty; choose another --out or pass "
                        f"{flag} to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on normal exit it becomes `out`.

    On an exception the temporary directory is deleted and `out` is left as it was, so a failed
    command leaves nothing half-written behind. Temporary directories that dead processes left
    beside `out` are removed first (remove_stale).
    """
    out = Path(out).expanduser().absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.with_name(f".{out.name}{TMP_TAG}{owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
