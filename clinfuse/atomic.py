"""Files replaced in one rename: a reader, or a process killed at any moment, finds the old
file or the whole new one, never half of one (model folders, explanation files, exports)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: Path, data: bytes, sweep: bool = True) -> None:
    """Replace `path` with `data` in one rename; on any error the old file stays as it was.
    `sweep` removes this file's temporaries a killed earlier writer left (a listing of the
    folder: a writer of one file per study calls `sweep_temporaries` once instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_temporaries(folder: Path, name: str = "*") -> None:
    """Remove the temporaries of `write_atomic` (of file `name`, or all) a killed writer left;
    not those of a process still running here (another run writing into the same folder)."""
    for stale in folder.glob(f".{name}.*.tmp"):
        if not _writer_running(stale):
            stale.unlink(missing_ok=True)


def _writer_running(temporary: Path) -> bool:
    """Whether the process named in a temporary's name (`.<name>.<pid>.<thread>.tmp`) runs."""
    try:
        pid = int(temporary.name[: -len(".tmp")].rsplit(".", 2)[1])
        os.kill(pid, 0)  # no signal sent: only asks whether the process exists
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True
