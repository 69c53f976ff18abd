"""Argument types shared by the command modules."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (and at most `maximum`), else a usage
    error saying so."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            wanted = f"{minimum} or more" if maximum is None else f"{minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"{value}: give {wanted}")
        return value

    return parse


def share(text: str) -> float:
    """An argparse type: a share of patients, at least 0 and below 1, else a usage error."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a share from 0 up to (not including) 1")
    return value


def one_of_each(choices: frozenset[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of `choices` ("fhir,sr", spaces and case
    forgiven), else a usage error naming what is not one, before any work starts."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown)}: not one of {', '.join(sorted(choices))}"
            )
        return values

    return parse
