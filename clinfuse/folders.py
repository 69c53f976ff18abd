"""What an output folder already is, told by the files each command writes there: a model
(`clinfuse train`), an inference run (`clinfuse infer`) or an evaluation report (`clinfuse
evaluate`). A command refuses an --out folder another command owns: its files would replace
the other's (a model's failures.csv, a run's predictions.csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from clinfuse.errors import ClinfuseError
from clinfuse.store.migrations import FOLDER_RUNS_FILE, STORE_FILE

Kind = Literal["model", "run", "report"]
# the files that make each kind (all of one group): a run folder on a shared store has no store
# file but its list of runs; an interrupted report, its metrics without its page
SIGNS: dict[Kind, tuple[tuple[str, ...], ...]] = {
    "model": (("config.json", "model.safetensors"),),
    "run": ((STORE_FILE,), ("predictions.parquet",), (FOLDER_RUNS_FILE,)),
    "report": (("metrics.json",),),
}
WRITER = {"model": "clinfuse train", "run": "clinfuse infer", "report": "clinfuse evaluate"}
OWN_FILES = {
    "model": "failures.csv is the training run's",
    "run": "predictions.csv and failures.csv are the run's exports",
    "report": "predictions.csv and failures.csv are the report's",
}


def folder_kind(folder: str | Path) -> Kind | None:
    """The kind of clinfuse folder `folder` is, or None (absent, empty, anything else)."""
    folder = Path(folder)
    for kind, alternatives in SIGNS.items():
        if any(all((folder / name).is_file() for name in files) for files in alternatives):
            return kind
    return None


def refuse_foreign_folder(folder: str | Path, own: Kind) -> None:
    """A `ClinfuseError` when `folder` is a folder of another kind than `own`, before anything
    is computed (the same kind is the command's own business: a resume, a report again)."""
    kind = folder_kind(folder)
    if kind is not None and kind != own:
        raise ClinfuseError(
            f"{folder}: is a `{WRITER[kind]}` {kind} folder; its {OWN_FILES[kind]}. Give --out "
            f"a folder of its own for this {own}"
        )
