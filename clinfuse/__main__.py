"""`python -m clinfuse` runs the command line."""

from clinfuse.cli import run

run()
