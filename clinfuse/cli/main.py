"""`clinfuse` subcommands. Each parses arguments, calls one library function, prints a result.

Exit status: 0 success; 1 the command ran but its verdict is negative (e.g. a manifest that
cannot be trained on); 2 a user error (bad arguments, a structural manifest error, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import select
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from clinfuse import __version__
from clinfuse.allocator import reuse_freed_memory
from clinfuse.cli import explain_commands, review_commands
from clinfuse.cli.args import at_least, one_of_each, share
from clinfuse.cli.stopping import StopSignals, Terminated, not_a_stop
from clinfuse.config import DataConfig, parse_config
from clinfuse.errors import ClinfuseError, ConfigError
from clinfuse.folders import WRITER, folder_kind
from clinfuse.spreadsheet import formula_safe

Command = Callable[[argparse.Namespace], int]


def _sample_data(args: argparse.Namespace) -> int:
    from clinfuse.synthetic import make_sample_data

    summary = make_sample_data(args.out_dir, n=args.n, seed=args.seed, size=args.size)
    print(summary)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from clinfuse.atomic import write_atomic
    from clinfuse.data.manifest import PatientSplit
    from clinfuse.data.validate import validate_manifest
    from clinfuse.exports.files import check_writable_file

    try:  # the shares training would refuse (data.val_fraction, data.test_fraction)
        parse_config(DataConfig, {"val_fraction": args.val, "test_fraction": args.test})
    except ConfigError as exc:
        raise ConfigError(
            "--val/--test",
            f"{args.val} and {args.test}: {exc.problem}",
            hint="give shares that add up to less than 1 (the defaults: 0.15 and 0.15)",
        ) from None
    out = args.out or Path(args.manifest).with_name(Path(args.manifest).stem + ".verdicts.csv")
    if Path(args.manifest).is_file():  # else the manifest's own error comes first
        if out.resolve() == Path(args.manifest).resolve():
            raise ClinfuseError(f"{out}: --out names the manifest itself; give another file")
        kind = next(  # the folder, or the one it is in (a run's fhir/, a model's tokenizer/)
            (k for folder in out.resolve().parents[:2] if (k := folder_kind(folder))), None
        )
        if kind is not None and out.exists() and not out.name.endswith(".verdicts.csv"):
            raise ClinfuseError(  # its config.json, failures.csv or metrics.json, say
                f"{out}: --out would replace a file of a `{WRITER[kind]}` {kind} folder; give "
                "a new file, or one named *.verdicts.csv"
            )
        check_writable_file(out)  # before the rows are read, not after
    report = validate_manifest(
        args.manifest,
        labels=[n.strip() for n in (args.labels or "").split(",") if n.strip()] or None,
        split=PatientSplit(val=args.val, test=args.test, seed=args.seed),
        workers=args.workers,
    )
    print(report.format_summary())
    write_atomic(out, formula_safe(report.verdicts).to_csv(index=False))
    print(f"per-row verdicts: {out}")
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    return 0 if report.trainable else 1


def _train(args: argparse.Namespace) -> int:
    from clinfuse.config import resolve_run_config
    from clinfuse.training.trainer import train

    cfg = resolve_run_config(args.config, args.overrides)
    result = train(args.manifest, args.out, cfg, device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 saved the model; it reports
        return 0
    macro = result.validation["macro"]
    if result.already_done:
        print(f"{result.model_dir} is already trained (rerun with a new --out to train again)")
    print(
        f"model: {result.model_dir}  epochs: {result.epochs} (best {result.best_epoch})  "
        f"time: {result.seconds:.0f} s{'  (resumed)' if result.resumed else ''}"
    )
    print(
        f"validation: macro AUROC {_fmt(macro['auroc'])}  AUPRC {_fmt(macro['auprc'])}  "
        f"ECE {_fmt(macro['ece'])} (before temperature {_fmt(macro.get('ece_before_temperature'))})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from clinfuse.evaluation.evaluate import (
        check_report_folder,
        evaluate_model,
        unique_names,
        write_evaluation,
    )
    from clinfuse.evaluation.report import failures_file

    check_report_folder(args.out)  # before the models are run, not after
    runs = {
        name: evaluate_model(
            folder,
            args.manifest,
            split=args.split,
            device=args.device,
            bootstrap=args.bootstrap,
            labels_path=args.labels,
        )
        for name, folder in zip(unique_names(args.model), args.model, strict=True)
    }
    report = write_evaluation(args.out, runs)
    for name, (run, _) in runs.items():
        macro = run.metrics["macro"]
        where = failures_file(list(runs), name)
        unread = f" ({len(run.failures)} not read: {where})" if run.failures else ""
        print(
            f"{name} ({run.model_version}) on {args.split}, n={run.metrics['n']}{unread}: "
            f"macro AUROC {_fmt(macro['auroc'])}  AUPRC {_fmt(macro['auprc'])}  "
            f"ECE {_fmt(macro['ece'])}"
        )
    print(f"metrics: {Path(args.out) / 'metrics.json'}\nreport: {report}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from clinfuse.inference import InferenceSettings, run_inference

    settings = InferenceSettings(
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        explain=args.explain,
        standards=args.standards,
        device=args.device,
        retry_failed=args.retry_failed,
    )
    if args.ray_address and args.engine != "ray":
        raise ConfigError(
            "--ray-address", "is for --engine ray", hint="add --engine ray, or leave it out"
        )
    if args.engine == "ray":
        from clinfuse.inference.ray_engine import run_inference_ray

        summary = run_inference_ray(
            args.model, args.manifest, args.out, args.store, settings, address=args.ray_address
        )
    else:
        summary = run_inference(args.model, args.manifest, args.out, args.store, settings)
    print(summary.format())
    if summary.total_failed and not summary.total_predicted:  # a scheduler must notice this
        print(
            f"error: every study of run {summary.run_id} failed; the reasons are in "
            f"{summary.run_dir / 'failures.csv'}",
            file=sys.stderr,
        )
        return 1
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        description="Multimodal (DICOM + clinical note) decision support: train, infer, explain, "
        "review. Decision support, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"clinfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "sample-data",
        help="write a deterministic synthetic hospital export (DICOM, notes, labels, truth)",
        description="Write a synthetic export: DICOM chest-radiograph-like images, notes, a "
        "manifest and explanation ground truth. Same arguments, same bytes.",
    )
    p.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    p.add_argument(
        "--n",
        type=at_least(1, 1_000_000),
        default=1000,
        help="number of studies (default 1000, at most 1,000,000: ~18 GB at 96 px)",
    )
    p.add_argument("--seed", type=at_least(0), default=0, help="random seed (default 0)")
    p.add_argument(
        "--size",
        type=at_least(32, 2048),
        default=96,
        help="image side in pixels (default 96, 32 to 2048)",
    )
    p.set_defaults(run=_sample_data)

    p = commands.add_parser(
        "validate",
        help="check every row of a manifest; exit 0 when it can be trained on",
        description="Check a manifest's structure, then every row (image decodes, note "
        "readable, labels valid). Prints a summary, writes per-row verdicts. Exit status 0 when "
        "the manifest can be trained on, 1 when training would refuse it (no usable row with a "
        "known label, or none in the train or the val split), 2 on a structural error.",
    )
    p.add_argument("manifest", type=Path, help="CSV, Parquet or JSONL manifest")
    p.add_argument("--out", type=Path, help="verdicts CSV (default MANIFEST.verdicts.csv)")
    p.add_argument("--labels", help="comma-separated label columns (default: all non-reserved)")
    p.add_argument("--val", type=share, default=0.15, help="validation share of patients")
    p.add_argument("--test", type=share, default=0.15, help="test share of patients")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--workers", type=at_least(0), default=1, help="processes reading files")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(run=_validate)

    p = commands.add_parser(
        "train",
        help="train, calibrate and save a model folder (resumable; DDP under torchrun)",
        description="Train on a manifest's train split, stop early on validation macro AUROC, "
        "fit per-label temperatures and thresholds on validation, and save a model folder. "
        "Rerunning the same command after an interruption resumes. Under `torchrun "
        "--nproc_per_node N` it trains with DistributedDataParallel.",
        epilog="examples of key=value: model.name=tiny model.fusion.mode=late train.epochs=5 "
        "train.lr=3e-4 data.labels=[copd,pneumonia]",
    )
    p.add_argument("--manifest", required=True, type=Path, help="training manifest")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--config", type=Path, help="YAML run config (see pipelines/*.yaml)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU when present)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(run=_train)

    p = commands.add_parser(
        "evaluate",
        help="metrics, predictions and an HTML report of model folders on a split",
        description="Score a manifest split with one or more model folders (side by side) at "
        "their saved calibration and thresholds; write metrics.json, predictions.csv and "
        "report.html. The split is rebuilt with each model's saved split settings.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        action="append",
        help="model folder (repeat to compare several)",
    )
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="the split to measure, the manifest split as the model's training split it",
    )
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when present)")
    p.add_argument(
        "--bootstrap",
        type=at_least(0),
        default=1000,
        help="resamples of the patients for 95%% CIs (0: none)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="measure against this table's labels (study_id + label columns: adjudicated "
        "labels, or a sample export's ground_truth/truth.csv) instead of the manifest's",
    )
    p.set_defaults(run=_evaluate)

    p = commands.add_parser(
        "infer",
        help="score a manifest in batch into a store and exports (resumable)",
        description="Stream a manifest through a model folder: every row ends as a prediction "
        "(calibrated probabilities, decisions at the saved thresholds, sides used, model "
        "version) or a recorded failure. Results are committed per batch; rerunning the same "
        "command after a crash continues where it stopped. Writes predictions.parquet, "
        "predictions.csv and failures.csv in --out, and the store (SQLite in --out by "
        "default, or --store postgresql+psycopg://...).",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder")
    p.add_argument("--manifest", required=True, type=Path, help="manifest to score")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--store", help="SQLAlchemy URL (default: sqlite in --out)")
    p.add_argument(
        "--explain",
        default="none",
        choices=["none", "positive", "all"],
        help="explanations for positive labels, all labels, or none",
    )
    p.add_argument("--standards", type=_standards, default=(), help="also write fhir,sr per study")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="score again the studies earlier invocations of this run recorded as failed (a "
        "file that was missing or unreadable then)",
    )
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="this machine, or a Ray cluster (the `ray` extra)",
    )
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start one locally)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="studies per batch")
    p.add_argument(
        "--workers", type=at_least(0), default=2, help="decoding (and, on CPU, scoring) processes"
    )
    p.add_argument(
        "--threads",
        type=at_least(1),
        help="the main process's model threads: explanations, or all the scoring with "
        "--workers 0 (default: the cores left by workers)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when present)")
    p.set_defaults(run=_infer)

    explain_commands.add_commands(commands)  # explain, explain-eval
    review_commands.add_commands(commands)  # dashboard, export, demo
    for command in commands.choices.values():
        command.formatter_class = WithDefaults
    return parser


class WithDefaults(argparse.HelpFormatter):
    """Help that gives each option's default, unless its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default  # 0 is a default to give, False (a flag off) is not
        empty = default is None or default is False or default is argparse.SUPPRESS
        silent = empty or default in ((), []) or not action.option_strings
        if silent or "default" in text:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


_PACKAGE = str(Path(__file__).resolve().parents[1])
_python_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """clinfuse's own warnings as one line for the user ("warning: ..."); others (torch,
    pydicom ...) as Python shows them, with their origin."""
    if str(filename).startswith(_PACKAGE):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # every command runs models on CPU batch after batch
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # Alembic announces its plugins whenever a new store is created,
        for chatty in ("alembic", "highdicom"):  # highdicom each module it copies into an SR
            logging.getLogger(chatty).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(not_a_stop)  # once: a handler keeps one copy of a filter
    warnings.formatwarning = _format_warning
    try:
        with StopSignals():
            return args.run(args)
    except (KeyboardInterrupt, Terminated) as stop:
        print(
            "interrupted: the same command continues where it stopped (train, infer, demo) "
            "or starts again",
            file=sys.stderr,
        )
        return 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)
    except ClinfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be made, no permission, a full disk: named
        if isinstance(exc, BrokenPipeError) and _stdout_gone():  # `| head` stopped reading
            return 128 + signal.SIGPIPE  # as Unix tools end then, without a message
        if args.verbose:
            raise
        in_the_way = _file_in_the_way(exc)
        if in_the_way:
            print(
                f"error: {in_the_way}: a file is where this command makes a folder; choose "
                "another path (or move the file)",
                file=sys.stderr,
            )
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"error: the disk is full{where}. Free space there, then run the same command "
                "again (a run resumes where it stopped)",
                file=sys.stderr,
            )
        else:
            print(f"error: {exc}. Check the path and its permissions", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: its own status, apart from infer's "every study failed" (1)
        traceback.print_exc()
        print(
            f"error: unexpected {type(exc).__name__} (above): a clinfuse bug, please report it; "
            "train and infer continue where they stopped when run again",
            file=sys.stderr,
        )
        return 3
    finally:
        warnings.formatwarning = _python_format


def _standards(text: str) -> tuple[str, ...]:
    """--standards as `one_of_each` export format; the exports (and pydicom) are imported only
    when it is given, not by every command."""
    from clinfuse.exports.files import FORMATS

    return one_of_each(FORMATS)(text)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (then it is pointed at
    /dev/null, so the exit's flush is quiet); another broken pipe (to a worker) is not this."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's capture)
        return False
    if gone:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def _file_in_the_way(exc: OSError) -> Path | None:
    """The file that stopped a folder from being made (mkdir of it or of a folder inside it)."""
    if not isinstance(exc, (FileExistsError, NotADirectoryError)) or not exc.filename:
        return None
    path = Path(exc.filename)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def run() -> None:
    """The console entry point: `main`'s exit status. After Ctrl-C (or SIGTERM) the process
    ends by that signal once the message is printed, so a shell loop running clinfuse stops
    too; once the command is done, a late Ctrl-C or SIGTERM (a scheduler's, while the
    interpreter shuts down) no longer turns its success into one."""
    code = main()
    stopped_by = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM}
    if code in stopped_by:
        signal.signal(stopped_by[code], signal.SIG_DFL)
        os.kill(os.getpid(), stopped_by[code])
    for late in stopped_by.values():  # the work is done: let the exit finish
        signal.signal(late, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
