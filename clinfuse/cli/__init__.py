"""The `clinfuse` command line: a thin shell over library functions (nothing imports it)."""

from clinfuse.cli.main import main, run

__all__ = ["main", "run"]
