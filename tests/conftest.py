"""Shared fixtures: a small synthetic export and a tiny model trained on it (once a session)."""

import os
import uuid
from pathlib import Path

import pytest

from clinfuse.cli import main
from clinfuse.synthetic import make_sample_data


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    """A 64-study synthetic export (64x64 images); returns its manifest path."""
    out = tmp_path_factory.mktemp("small_export")
    make_sample_data(out, n=64, seed=5, size=64)
    return out / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_model(small_export, tmp_path_factory) -> Path:
    """The `tiny` architecture trained for two epochs on `small_export`; returns its folder."""
    out = tmp_path_factory.mktemp("tiny_model") / "tiny"
    args = [
        "train",
        "--manifest",
        str(small_export),
        "--out",
        str(out),
        "model.name=tiny",
        "train.epochs=2",
        "train.bootstrap=20",
    ]
    assert main(args) == 0
    return out


def _postgres_server() -> str | None:
    """A server URL (without database) that accepts us, or None."""
    try:
        import psycopg
    except ImportError:
        return None
    if os.environ.get("CLINFUSE_TEST_POSTGRES"):
        return os.environ["CLINFUSE_TEST_POSTGRES"]
    for user in ("postgres", "root"):
        try:
            psycopg.connect(
                host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=3
            ).close()
        except psycopg.Error:
            continue
        return f"postgresql+psycopg://{user}@127.0.0.1:5432"
    return None


@pytest.fixture(scope="module")
def postgres_database():
    """A throwaway PostgreSQL database for one test module (URL), dropped afterwards; the
    tests using it skip only when no server is reachable."""
    import sqlalchemy as sa

    server = _postgres_server()
    if server is None:
        pytest.skip(
            "no PostgreSQL server reachable (set CLINFUSE_TEST_POSTGRES=postgresql+psycopg://...)"
        )
    name = f"clinfuse_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{server}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        try:  # ICU English sorts 'a10' before 'B2': the store must still order by code point
            conn.exec_driver_sql(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except sa.exc.DBAPIError:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield f"{server}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()
