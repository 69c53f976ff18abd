"""Opening a store's database: an engine that behaves alike on SQLite and PostgreSQL, and the
Alembic migrations (run from code: no alembic.ini, the package is the configuration).

The engine gives UTC timestamps, strict JSON, enforced foreign keys, and on SQLite WAL with real
transactions in which a writer takes the write lock up front. `migrate` upgrades a database in
one transaction; an advisory lock (PostgreSQL) or the write lock (SQLite) serialises processes
that open a new store at the same moment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from clinfuse.store.schema import StoreError, dumps_json

SCRIPTS = Path(__file__).parent
_LOCK = 7_204_918_306  # PostgreSQL advisory lock id: "a clinfuse migration is running"
_ALEMBIC = threading.Lock()  # alembic's `context` and `op` are process-wide: one run at a time
_WRITE = "clinfuse_write"  # execution option: on SQLite, take the write lock at BEGIN


_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
STORE_FILE = "clinfuse.db"  # a run folder's own store
FOLDER_RUNS_FILE = "runs.json"  # in a run folder on a shared store: the runs that wrote it


def sqlite_url(path: Path) -> str:
    """sqlite:///<absolute path>, the path escaped: a folder named "run%20A" or "night?1"
    would otherwise name another file ("run A", "night")."""
    return sa.URL.create("sqlite", database=str(path.expanduser().resolve())).render_as_string()


def store_url(value: str | Path) -> str:
    """A store's SQLAlchemy URL: a URL as given, or the path of a SQLite file (one that exists,
    or a name ending .db, .sqlite or .sqlite3) as sqlite:///<absolute path>, or a run folder
    holding its own store (`STORE_FILE`) as that file's."""
    text = str(value)
    if "://" not in text:
        path = Path(text).expanduser()
        if path.is_dir() and (path / STORE_FILE).is_file():
            return sqlite_url(path / STORE_FILE)
        if path.suffix.lower() in _SQLITE_SUFFIXES or path.is_file():
            return sqlite_url(path)
    return text


def parse_url(url: str | Path) -> sa.URL:
    """`store_url` parsed; a StoreError (never echoing the value: it may hold a password) when
    it is neither a database URL nor a SQLite file's path."""
    folder = Path(url).expanduser() if "://" not in str(url) else None  # a path, not a URL
    if (
        folder is not None
        # repeated only when it reads as a path: "user:pw@host", "password=...", a URL
        # missing a slash ("postgresql:/db?password=...") are not repeated
        and not re.search(r"[@=?]|:/", str(url))
        and folder.suffix.lower() not in _SQLITE_SUFFIXES  # a new store's file: `connect` says
        and not folder.exists()
    ):
        raise StoreError(
            f"no store at {url}: no such file or folder; give the folder `clinfuse infer --out` "
            "wrote, a SQLite file (a new one named .db, .sqlite or .sqlite3) or a database URL"
        )
    if folder is not None and folder.is_dir() and not (folder / STORE_FILE).is_file():
        if (folder / FOLDER_RUNS_FILE).is_file():
            raise StoreError(
                f"no store at {url}: this run folder's runs were written to a shared store "
                "(`clinfuse infer --store`); give that store's URL"
            )
        raise StoreError(
            f"no store at {url}: a folder without a run's {STORE_FILE}; give the folder "
            "`clinfuse infer --out` wrote, or the store's URL"
        )
    try:
        return sa.make_url(store_url(url))
    except sa.exc.ArgumentError:
        raise StoreError(
            "the store URL is not a database URL (not repeated here: it may hold a password): "
            "give sqlite:///path/to/clinfuse.db (or the path of a .db file, or of a run folder "
            "holding its clinfuse.db) or postgresql+psycopg://user@host/database"
        ) from None


def connect(url: str, create: bool = True) -> sa.Engine:
    """An engine for a SQLite or PostgreSQL URL, or a SQLite file's path (`store_url`); a SQLite
    file's folder is created; with `create=False` a SQLite file that does not exist is an
    error, not a new empty store."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(
            f"{backend}: not a database clinfuse keeps a store in; give sqlite:///path/to/"
            "clinfuse.db or postgresql+psycopg://user@host/database (postgresql, not postgres)"
            if backend == "postgres"
            else f"{backend}: a clinfuse store is SQLite (sqlite:///path/to/clinfuse.db) or "
            "PostgreSQL (postgresql+psycopg://user@host/database)"
        )
    if backend == "postgresql":
        try:
            return sa.create_engine(parsed, json_serializer=dumps_json, pool_pre_ping=True)
        except (ImportError, sa.exc.NoSuchModuleError) as exc:  # +psycopg2, +pg8000, ...
            raise StoreError(
                f"this URL's PostgreSQL driver ({parsed.get_driver_name()}) is not installed "
                f"({exc}): use postgresql+psycopg://... (clinfuse's `postgres` extra installs "
                "psycopg), or install that driver"
            ) from None
    memory = parsed.database in (None, "", ":memory:")
    if not memory and not create and not Path(parsed.database).expanduser().is_file():
        raise StoreError(
            f"no store at {parsed.database}: check the path (`clinfuse infer` creates a run's "
            "store, RUN_DIR/clinfuse.db)"
        )
    if not memory:
        database = Path(parsed.database).expanduser()
        database.parent.mkdir(parents=True, exist_ok=True)
        if create and not database.exists():  # it holds the key the pseudonyms are made with:
            # whoever reads it can re-identify them by trying ids, so its owner's alone
            with contextlib.suppress(FileExistsError):
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    engine = sa.create_engine(
        parsed,
        json_serializer=dumps_json,
        connect_args={"timeout": 60, "check_same_thread": False},
        poolclass=sa.StaticPool if memory else None,
    )

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the "begin" hook below starts transactions
        cursor = dbapi_connection.cursor()
        if not memory:
            _wal_mode(cursor)
            # WAL's recommended durability: a commit survives a killed process (kill -9) without
            # an fsync each; a power cut may roll back the last commits, which a rerun redoes
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # A writer takes SQLite's write lock up front (waiting out the busy timeout), so two
        # writers queue instead of failing when a read lock cannot be upgraded.
        write = conn.get_execution_options().get(_WRITE)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _wal_mode(cursor: Any, timeout: float = 60.0) -> None:
    """Switch a SQLite file to WAL. The first openers of a new file race for the exclusive lock
    this needs, and SQLite answers "database is locked" at once (no busy wait), so retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _remedy(reason: str) -> str:
    """What to do about a write the database refused, from its message."""
    said = reason.lower()
    if "lock" in said or "busy" in said:
        return (
            "another process held the store past the wait (another run or a dashboard "
            "writing to it); let it finish"
        )
    if "readonly" in said or "read-only" in said or "permission" in said:
        return "make the store writable for this user"
    if "full" in said or "space" in said:
        return "free disk space"
    if "nul" in said or "0x00" in said or "invalid byte sequence" in said:
        return "remove the NUL or invalid characters from the manifest's cells"
    return "fix the database or the connection to it"


@contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One write transaction: commits on success, rolls everything back on any exception. The
    database refusing it (disk full, locked by another writer, server gone, file read-only) is
    a `StoreError` naming the store and what to do; what the run wrote before stays, and the
    same command resumes once it is fixed."""
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn
    except (sa.exc.OperationalError, sa.exc.DataError) as exc:
        shown = engine.url.render_as_string(hide_password=True)
        reason = " ".join(str(exc.orig or exc).split())[:300]
        raise StoreError(
            f"the store {shown} refused a write ({reason}). Nothing of that write was kept; "
            f"{_remedy(reason)}, then run the same command again"
        ) from exc


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest schema revision this clinfuse ships."""
    return str(ScriptDirectory.from_config(_config()).get_current_head())


def current_revision(connection: sa.Connection) -> str | None:
    """The revision a database is at, or None for an empty database."""
    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision`; a store newer than this clinfuse is refused."""
    with _ALEMBIC, write_transaction(engine) as conn:  # this lock first, then the database's
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        config = _config(conn)
        found = current_revision(conn)
        if found is not None:
            try:
                ScriptDirectory.from_config(config).get_revision(found)
            except CommandError as error:
                where = engine.url.render_as_string(hide_password=True)
                raise StoreError(
                    f"{where}: the store's schema revision {found!r} is newer than this "
                    f"clinfuse knows (its newest is {head_revision()!r}); upgrade clinfuse"
                ) from error
        command.upgrade(config, revision)
