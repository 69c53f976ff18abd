"""Files replaced in one rename: a reader, or a process killed at any moment, finds the old
file or the whole new one, never half of one (model folders, explanation files, exports)."""

from __future__ import annotations

import functools
import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, data: bytes | str, sweep: bool = True) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one rename; on any error the
    old file stays as it was. `sweep` removes this file's temporaries a killed earlier writer
    left (a listing of the folder: a writer of one file per study calls `sweep_temporaries`
    once instead). An existing file keeps its permission bits; a symbolic link is replaced by
    the file, never followed (one planted in a shared folder would aim the write elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_temporaries(path.parent, path.name)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp, handle = open_temporary(path)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists() and not path.is_symlink():  # else the umask's mode, as `open` gives
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_temporary(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary beside `path`, named for this writer (see `sweep_temporaries`) and
    open for binary writing: always a file created now, never an existing one or the target of
    a link planted under its name (O_EXCL, O_NOFOLLOW), with the umask's mode."""
    tmp = path.with_name(f".{path.name}.{_writer(os.getpid())}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_BINARY", 0)  # Windows: no \n -> \r\n in a binary file
    return tmp, os.fdopen(os.open(tmp, flags, 0o666), "wb")


def sweep_temporaries(folder: Path, name: str = "*") -> None:
    """Remove the temporaries of `write_atomic` (of file `name`, or all) a killed writer left;
    not those of a process still running here (another run writing into the same folder)."""
    for stale in folder.glob(f".{name}.*.tmp"):
        if not _writer_running(stale):
            stale.unlink(missing_ok=True)


@functools.cache
def _writer(pid: int) -> str:
    """Process `pid` (this one: the argument keys the cache, a forked worker is another) as a
    temporary's name gives it: `<pid>-<start time>` where the start time is known (Linux), so
    a later process given the same pid (a container's 1) is not taken for the writer."""
    started = _start_time(pid)
    return f"{pid}-{started}" if started else str(pid)


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name before ")" may hold spaces


def _writer_running(temporary: Path) -> bool:
    """Whether the process that named a temporary (`.<name>.<writer>.<thread>.tmp`) runs."""
    try:
        pid, _, started = temporary.name[: -len(".tmp")].rsplit(".", 2)[1].partition("-")
        pid_number = int(pid)
    except (ValueError, IndexError):
        return False
    if started and Path("/proc").is_dir():
        return _start_time(pid_number) == started
    try:
        os.kill(pid_number, 0)  # no signal sent: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def current_umask() -> int:
    """The process's umask, read without setting it (`os.umask` would change it for every
    thread meanwhile); from /proc on Linux, else read and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
