"""Files that are never half-written, output folders with one writer at a time, and write
failures that end as one line.

- `atomic_write` / `atomic_file`: write to a hidden temporary file beside the target, then
  rename it over the target (a rename within a folder is atomic), so a reader sees the old file
  or the new one, never a truncated one; a failed write leaves the old file as it was.
- `output_folder`: a run writes into a staging folder beside `--out`; only when it completes is
  a completion marker written and the staging folder swapped in. A failed or interrupted run
  leaves the old folder untouched (and removes its staging folder).
- `FolderLock`: one writer per output folder. The lock file names its holder (pid, host,
  command, start time); a lock whose process is gone, or an empty one, is stale and taken over.
  Whoever takes the lock also clears what dead writers of that folder left beside it (staging,
  saving and swap folders named with their process id, `clean_leftovers`): a killed run never
  blocks or litters the next one, and a live process's work is never touched.
- `write_error`: the one-line message for disk full, file too large, read-only, permission
  denied, not a directory; `library_write_error` finds the same reason when torch or
  safetensors wrapped the OS error in their own exception.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from eexit.errors import EexitError

COMPLETE_MARKER = "complete.json"
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large (a file-size limit was reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder",
}


def write_error(e: OSError, what: str = "") -> EexitError:
    """The one-line error for a failed write."""
    reason = WRITE_ERRNOS.get(e.errno, e.strerror or type(e).__name__)
    where = e.filename or what or "a file"
    return EexitError(f"cannot write {where}: {reason}; nothing that existed before was replaced")


OS_ERROR_CODE = re.compile(r"(?:os error |code: |\[Errno )(\d+)")


def library_write_error(e: BaseException, where: str | Path, written: Path | None = None):
    """The one-line error for a write that failed inside torch, safetensors or accelerate, which
    wrap the OS error in their own exceptions (torch's zip writer only says "unexpected pos"):
    the errno when the message or the exception chain holds one, else a file of `written` at the
    process's file-size limit (EFBIG) or a full file system (ENOSPC). None when nothing shows a
    failed write: the caller re-raises, a real bug keeps its traceback."""
    import resource

    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return write_error(OSError(seen.errno, seen.strerror), str(where))
        match = OS_ERROR_CODE.search(str(seen))
        if match and int(match.group(1)) in WRITE_ERRNOS:
            return write_error(OSError(int(match.group(1)), ""), str(where))
        seen = seen.__cause__ or seen.__context__
    if written is not None and written.exists():
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [p for p in written.rglob("*") if p.is_file()] if written.is_dir() else [written]
        if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in files):
            return write_error(OSError(errno.EFBIG, ""), str(where))
        fs = os.statvfs(written)
        if fs.f_bavail * fs.f_frsize < 1 << 20:
            return write_error(OSError(errno.ENOSPC, ""), str(where))
    return None


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


def atomic_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    """`torch.save` through memory, so a write failure is an OSError and never a partial file."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`; an existing `target` is moved aside first and removed only
    once `new` is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 / -1 would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on an output folder: a lock file beside it, created atomically."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        self.path = folder.with_name(f".{folder.name}.lock")
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> FolderLock:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:  # being written this instant, or garbage: look again
                    time.sleep(0.05)
                    other = self.holder()
                pid = other.get("pid") if isinstance(other, dict) else None
                ours = type(pid) is int and pid > 0 and isinstance(other.get("host"), str)
                if not ours:
                    other = None  # not a lock this code wrote: garbage, taken over
                same_host = other is not None and other.get("host") == me["host"]
                if other is not None and (not same_host or _alive(pid)):
                    raise EexitError(
                        f"{self.folder} is being written by process {other.get('pid')} on "
                        f"{other.get('host')} ({other.get('command')}, since "
                        f"{other.get('since')}); wait for it to finish or choose another --out"
                    ) from None
                with contextlib.suppress(OSError):  # stale: its process is gone
                    self.path.unlink()
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:  # disk full: no empty lock left behind to puzzle the next run
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise write_error(e, str(self.path)) from None
            self.held = True
            clean_leftovers(self.folder)
            return self
        raise EexitError(f"cannot take the lock {self.path}; remove it if no eexit run is active")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|saving|old|overwrite|tmp)-(?P<pid>\d+)$")


def leftover_pid(path: Path, name: str | None = None) -> int | None:
    """The process id in a hidden staging / saving / swap / temporary name (`.NAME.staging-PID`,
    `.NAME.tmp-PID`, ...), when `path` is one (and belongs to `name`, if given)."""
    m = LEFTOVER.match(path.name)
    if m is None or (name is not None and m["name"] != name):
        return None
    return int(m["pid"])


def clean_leftovers(target: str | Path) -> list[Path]:
    """What dead writers of `target` left beside it: staging, saving and overwrite folders and
    temporary files named `.TARGET.KIND-PID` whose process is gone are removed; a swap that was
    cut between its two renames (`.TARGET.old-PID` and no `TARGET`) is put back. Call it holding
    `target`'s lock. Returns what was removed or restored."""
    target = Path(target)
    done = []
    if not target.parent.is_dir():
        return done
    for p in sorted(target.parent.iterdir()):
        pid = leftover_pid(p, target.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            if LEFTOVER.match(p.name)["kind"] == "old" and not target.exists():
                os.rename(p, target)  # the old folder is the only copy: it goes back
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(p)
    return done


def clean_dead_temporaries(folder: str | Path) -> list[Path]:
    """Inside a folder this process holds the lock of: temporary files and saving folders of dead
    processes (`.NAME.tmp-PID`, `.NAME.saving-PID`), whatever NAME."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        pid = leftover_pid(p)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            done.append(p)
    return done


def check_output_path(out: Path, overwrite: bool, what: str = "results folder") -> None:
    """Refuse, before any work, an --out that cannot become this run's folder."""
    if out.exists() and not out.is_dir():
        raise EexitError(f"--out {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EexitError(f"{what} {out} already exists; pass --overwrite to replace it")
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise EexitError(f"--out {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise EexitError(f"--out {out}: cannot write in {parent} (permission denied)")
            break


@contextlib.contextmanager
def output_folder(out: str | Path, overwrite: bool, what: str = "results folder"):
    """Yield a staging folder for this run's files; on success write the completion marker and
    swap it in for `out`; on failure remove it and leave `out` as it was. One writer at a time."""
    out = Path(out)
    check_output_path(out, overwrite, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, str(out)) from None
    with FolderLock(out):
        check_output_path(out, overwrite, what)  # again, now that we hold the lock
        staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            yield staging
            marker = {"complete": True, "finished": _now()}
            prov = staging / "provenance.json"
            if prov.is_file():  # the run's provenance, beside the completion
                marker["provenance"] = json.loads(prov.read_text())
            atomic_json(staging / COMPLETE_MARKER, marker)
            replace_folder(staging, out)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            ours = e.filename is None or str(e.filename).startswith((str(staging), str(out)))
            if ours and e.errno in WRITE_ERRNOS:
                raise write_error(e, str(out)) from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_script(main) -> None:
    """The entry of a script outside the CLI (benchmarks, experiments): `main()`'s return code,
    or bad input and failed writes as one line on stderr with the error's exit code (2), no
    traceback, as `eexit` itself does."""
    import sys

    try:
        code = main()
    except EexitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
