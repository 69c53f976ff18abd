"""`clinfuse dashboard`, `clinfuse export` and `clinfuse demo`: shells over `clinfuse.review`
and the train / evaluate / infer library functions.

`add_commands(commands)` registers the three on the subparsers of `clinfuse.cli.main`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from clinfuse.cli.args import at_least
from clinfuse.errors import ClinfuseError

QUICK_STUDIES, QUICK_SCORED = 64, 4  # --quick: a 64-study export, 4 held-out studies scored


class DashboardError(ClinfuseError):
    """The dashboard cannot start: no app, no streamlit, or an unsafe address."""


# -- dashboard --------------------------------------------------------------------------------
def dashboard_app() -> Path:
    """dashboard/app.py of the source checkout clinfuse runs from."""
    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    if not app.is_file():
        raise DashboardError(
            f"{app} not found: the dashboard ships with the clinfuse source checkout; "
            "install clinfuse from a clone of the repository (pip install -e '.[dashboard]')"
        )
    return app


def oidc_configured(cwd: Path | None = None) -> bool:
    """True when a Streamlit secrets file the app will read has an [auth] section (st.login)."""
    for secrets in (Path.home() / ".streamlit", (cwd or Path.cwd()) / ".streamlit"):
        try:
            text = (secrets / "secrets.toml").read_text(encoding="utf-8")
        except OSError:
            continue
        if _has_auth(text):
            return True
    return False


def _has_auth(text: str) -> bool:
    try:
        import tomllib
    except ImportError:  # Python 3.10: look for the table header
        return re.search(r"^\s*\[auth[\].]", text, re.MULTILINE) is not None
    try:
        return bool(tomllib.loads(text).get("auth"))
    except tomllib.TOMLDecodeError:
        return False


def dashboard_command(store_url: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that serve the dashboard on host:port for the store at a URL.

    The URL travels in CLINFUSE_STORE; it is also put on the command line (`-- --store URL`)
    only when it holds no password, so `ps` never shows one. Refuses an address other than
    localhost unless OIDC login is configured.
    """
    from clinfuse.review import LOCAL_HOSTS
    from clinfuse.store import parse_url

    if host not in LOCAL_HOSTS and not oidc_configured():
        raise DashboardError(
            f"refusing --host {host}: without OIDC login anyone who reaches it could review; "
            "configure [auth] in .streamlit/secrets.toml (st.login) or use 127.0.0.1"
        )
    if importlib.util.find_spec("streamlit") is None:
        raise DashboardError("streamlit is not installed: pip install 'clinfuse[dashboard]'")
    argv = [sys.executable, "-m", "streamlit", "run", str(dashboard_app())]
    argv += ["--server.address", host, "--server.port", str(port)]
    argv += ["--browser.gatherUsageStats", "false"]
    url = parse_url(store_url)
    store_url = url.render_as_string(hide_password=False)
    if url.password is None:
        argv += ["--", "--store", store_url]
    return argv, {**os.environ, "CLINFUSE_STORE": store_url}


def serve_dashboard(store_url: str, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve the dashboard until it is stopped (Ctrl-C); on POSIX this process becomes it."""
    from clinfuse.store import Store

    argv, env = dashboard_command(store_url, host, port)
    Store(store_url, create=False).close()  # a wrong path or an unreachable server: say so now
    print(f"dashboard: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    if os.name == "posix":  # signals reach Streamlit itself; no orphan when this is killed
        os.execve(argv[0], argv, env)
    try:
        return subprocess.call(argv, env=env)
    except KeyboardInterrupt:
        return 0


def _dashboard(args: argparse.Namespace) -> int:
    return serve_dashboard(args.store, args.host, args.port)


# -- export -----------------------------------------------------------------------------------
EXPORT_NAMES = {"manifest": "reviewed_manifest.csv", "agreement": "agreement.csv"}


def export_path(given: str, form: str) -> Path:
    """Where `export --out` writes: a .csv or .parquet file; a folder (one that exists, or a
    name ending in a separator or without a suffix, made when the export is written) gets the
    format's own file name. Any other suffix is refused before anything is written."""
    out = Path(given).expanduser()
    if out.is_dir() or given.endswith(("/", os.sep)) or not out.suffix:
        return out / EXPORT_NAMES[form]
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ClinfuseError(
            f"--out {given}: write a .csv or .parquet file, or name a folder for "
            f"{EXPORT_NAMES[form]}"
        )
    return out


def _export(args: argparse.Namespace) -> int:
    from clinfuse.data.manifest import read_table
    from clinfuse.review import export_reviewed_manifest, review_agreement
    from clinfuse.review.export import other_reviewed_runs, write_table
    from clinfuse.store import Store, StoreError

    out = export_path(args.out, args.format)
    with Store(args.store, create=False) as store:
        runs = store.runs()
        if not runs:
            raise StoreError("the store has no inference run")
        run_id = args.run_id if args.run_id is not None else runs[-1]["id"]
        store.run(run_id)  # an unknown run is refused before anything is made
        if args.format == "manifest":
            export_reviewed_manifest(store, run_id, out)
            print(f"reviewed manifest of run {run_id}: {out} ({len(read_table(out))} studies)")
            print(f"train on it: clinfuse train --manifest {out} --out MODEL_DIR")
        else:
            table = review_agreement(store, run_id)
            other_reviewed_runs(store, run_id, reviewed=len(table) > 0)  # none: as the manifest
            write_table(table, out, for_people=True)
            print(table.to_string(index=False))
            print(f"agreement of run {run_id}: {out}")
    return 0


# -- demo -------------------------------------------------------------------------------------
def _step(name: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {name}", flush=True)


def demo_data(out: Path, quick: bool) -> Path:
    """The demo's manifest: the committed sample_data/ (or a generated one; small if quick)."""
    from clinfuse.synthetic import make_sample_data

    committed = Path(__file__).resolve().parents[2] / "sample_data" / "manifest.csv"
    if not quick and committed.is_file():
        return committed
    folder = out / "sample_data"
    if not (folder / "manifest.csv").is_file():
        small = {"n": QUICK_STUDIES, "size": 64} if quick else {}  # else the documented defaults
        make_sample_data(folder, seed=0, **small)
    return folder / "manifest.csv"


def held_out_manifest(model_dir: Path, manifest: Path, out: Path, limit: int | None) -> Path:
    """Write the model's test split of `manifest` (absolute paths) as the manifest to score."""
    from clinfuse.data.manifest import PatientSplit, load_manifest
    from clinfuse.model.checkpoint import read_checkpoint_config

    data = read_checkpoint_config(model_dir).get("data", {})
    split = PatientSplit(
        data.get("val_fraction", 0.15), data.get("test_fraction", 0.15), data.get("split_seed", 0)
    )
    table = load_manifest(manifest, split=split).table
    table = table[table["split"] == "test"].head(limit)
    for column in ("image", "note_path"):
        table[column] = [str(manifest.parent / p) if p else "" for p in table[column]]
    table = table.drop(columns=["row", "split"])
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.0f")
    return out


def run_demo(out: Path, quick: bool) -> dict[str, str]:
    """Sample data -> train -> evaluate -> infer with explanations; where everything is.

    Rerunning on the same folder reuses what is done (training and inference resume).
    """
    from clinfuse.config import resolve_run_config
    from clinfuse.evaluation.evaluate import evaluate_model, write_evaluation
    from clinfuse.inference import InferenceSettings, run_inference
    from clinfuse.store import Store
    from clinfuse.training.trainer import train

    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _step("sample data", started)
    manifest = demo_data(out, quick)
    _step(f"training {'the tiny model (--quick)' if quick else 'the default model'}", started)
    overrides = ["model.name=tiny", "train.epochs=1", "train.bootstrap=20"] if quick else []
    model_dir = out / "model"
    result = train(manifest, model_dir, resolve_run_config(None, overrides))
    _step("evaluating on the held-out test split", started)
    evaluation = write_evaluation(
        out / "evaluation",
        {"model": evaluate_model(model_dir, manifest, "test", bootstrap=20 if quick else 200)},
    )
    _step("batch inference with explanations (positive labels)", started)
    scored = held_out_manifest(
        model_dir, manifest, out / "inference_manifest.csv", QUICK_SCORED if quick else None
    )
    run_dir = out / "run"
    settings = InferenceSettings(explain="positive", workers=0 if quick else 1)
    summary = run_inference(model_dir, scored, run_dir, None, settings)
    _step("done", started)
    auroc = result.validation.get("macro", {}).get("auroc")  # None: no label had both classes
    return {
        "data": str(manifest),
        "model": str(result.model_dir),
        "model card": str(result.model_dir / "MODEL_CARD.md"),
        "validation macro AUROC": "n/a" if auroc is None else f"{auroc:.3f}",
        "evaluation report": str(evaluation),
        "scored manifest": str(scored),
        "run": f"{run_dir} (run {summary.run_id}: {summary.total_predicted} predicted, "
        f"{summary.total_failed} failed)",
        "predictions": str(run_dir / "predictions.csv"),
        "explanations": str(run_dir / "explanations"),
        "store": Store.default_url(run_dir),
    }


def _demo(args: argparse.Namespace) -> int:
    from clinfuse.model.checkpoint import NOTICE

    if not args.no_dashboard:
        dashboard_command("sqlite://", "127.0.0.1", 8501)  # fail now, not after the work
    found = run_demo(args.out, args.quick)
    width = max(len(k) for k in found) + 1
    print("\n".join(f"{k + ':':<{width}} {v}" for k, v in found.items()))
    command = f"clinfuse dashboard --store {found['store']}"
    print(f"{'review:':<{width}} {command}")
    print(NOTICE, flush=True)
    if args.no_dashboard:
        return 0
    return serve_dashboard(found["store"])


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `dashboard`, `export` and `demo` on `clinfuse`'s subcommands."""
    p = commands.add_parser(
        "dashboard",
        help="review a store's predictions in the browser (Streamlit)",
        description="Serve the review dashboard for a store: a worklist of scored studies, a "
        "study view with explanations, and a verdict form whose append-only reviews become "
        "labels. Binds to 127.0.0.1 unless OIDC login ([auth] in .streamlit/secrets.toml) is "
        "configured.",
    )
    p.add_argument("--store", required=True, help="SQLAlchemy URL of the store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=at_least(1, 65535), default=8501, help="port (default 8501)")
    p.set_defaults(run=_dashboard)

    p = commands.add_parser(
        "export",
        help="reviewed studies as a training manifest, or reviewer agreement per label",
        description="Write the reviewed studies of a run as a CSV manifest `clinfuse train` "
        "accepts (labels from each study's latest review; patients by pseudonym), or a CSV of "
        "how often reviewers agreed with the model, per label.",
    )
    p.add_argument("--store", required=True, help="SQLAlchemy URL of the store")
    p.add_argument("--run", dest="run_id", type=int, help="run id (default: the latest run)")
    p.add_argument("--format", required=True, choices=["manifest", "agreement"])
    p.add_argument(
        "--out",
        required=True,
        help="file to write: CSV, or Parquet for a .parquet name; in a folder, "
        "reviewed_manifest.csv or agreement.csv",
    )
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "demo",
        help="sample data -> train -> evaluate -> infer with explanations -> dashboard",
        description="Run every job on the sample data with nothing to configure: train the "
        "default model, evaluate it on the held-out split, score the held-out studies with "
        "explanations into an SQLite store, print where everything is, and open the dashboard.",
    )
    p.add_argument("--out", type=Path, default=Path("clinfuse-demo"), help="folder to write")
    p.add_argument("--no-dashboard", action="store_true", help="stop before the dashboard")
    p.add_argument(
        "--quick", action="store_true", help="a small export and the tiny model (about a minute)"
    )
    p.set_defaults(run=_demo)
