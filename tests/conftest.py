"""Shared fixtures: a small synthetic export and a tiny model trained on it (once a session)."""

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
