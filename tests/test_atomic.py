"""`write_atomic`: whole files or the old one, links and permissions kept, stale temporaries
swept; what every model folder, explanation file and export relies on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clinfuse.atomic import sweep_temporaries, write_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "predictions.csv"
    write_atomic(target, "a,b\n")
    write_atomic(target, b"c,d\n")
    assert target.read_text() == "c,d\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["predictions.csv"]


def test_a_link_planted_under_a_temporarys_name_is_never_written_through(tmp_path):
    """Anyone who can write a shared run folder could plant links where the temporaries go:
    the write refuses them instead of overwriting the file they aim at."""
    import threading

    from clinfuse.atomic import _writer

    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep")
    target = tmp_path / "run" / "predictions.csv"
    target.parent.mkdir()
    planted = target.with_name(f".{target.name}.{_writer(os.getpid())}.{threading.get_ident()}.tmp")
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(target, "a,b\n", sweep=False)
    assert victim.read_text() == "keep" and not target.exists()


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, 123)  # type: ignore[arg-type]  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_link_is_replaced_never_followed(tmp_path):
    """A link planted in a shared run folder must not aim the write at another file."""
    elsewhere = tmp_path / "elsewhere" / "settings.cfg"
    elsewhere.parent.mkdir()
    elsewhere.write_text("keep")
    link = tmp_path / "report.html"
    link.symlink_to(elsewhere)
    write_atomic(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert elsewhere.read_text() == "keep"


def test_an_existing_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "failures.csv"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_atomic(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_text() == "new"


def test_sweep_removes_a_dead_writers_temporary_not_a_running_ones(tmp_path: Path) -> None:
    dead = tmp_path / ".a.npz.999999999.1.tmp"  # no such process
    alive = tmp_path / f".a.npz.{os.getpid()}.1.tmp"  # this process, named without start time
    for path in (dead, alive):
        path.write_bytes(b"partial")
    sweep_temporaries(tmp_path)
    assert not dead.exists() and alive.exists()
