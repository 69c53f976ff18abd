"""Benchmark every registered architecture's forward pass: parameters, FLOPs, latency, memory.

    python pipelines/bench_model.py [--models a,b] [--batches 1,16] [--repeats N]
        [--max-seconds S] [--device cpu|cuda] [--threads T] [--out benchmarks/model]

Each registered model runs in its default `cross_attention` mode, and `small` in all four
fusion modes, as inference runs it (eval mode, `torch.inference_mode()`, the image trunk laid
out channels-last as `load_checkpoint` does), with every image present and notes
of 60-100 tokens (consecutive sample notes joined). Every (model, batch) runs in a fresh
subprocess so its peak memory is its own. The machine's fp32 matmul peak is measured in the
same run (before and after the models), so the share of peak is a ratio within one run.
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.data.manifest import load_manifest
from clinfuse.machine import cpu_name
from clinfuse.model import FusionModel, create_model, list_models, model_config
from clinfuse.training.trainer import training_notes

MANIFEST = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.csv"
LABELS = ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass")
FUSION_MODES = ("cross_attention", "late", "image_only", "text_only")
TOWERS = ("image", "text")  # parameters named <tower>_encoder.* or missing_<tower>


# -- one (model, batch) measurement, run in its own subprocess ------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set size now (VmRSS) or at its peak (VmHWM), Linux only.

    Not `ru_maxrss`: Linux carries it across exec, so a child starts at its parent's peak."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(ln.split()[1]) for ln in status if ln.startswith(f"{field}:")) / 1024


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (steal included) and by this process."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def realistic_notes(
    model: FusionModel, sample: list[str], count: int, low: int = 60, high: int = 100
) -> list[str]:
    """`count` notes of `low`-`high` tokens ([CLS]/[SEP] included): sample notes joined."""
    tokenizer = model.note_tokenizer.tokenizer  # the raw tokenizer: no truncation, no padding
    notes, current = [], ""
    for text in islice(cycle(sample), 100 * count):
        current = f"{current} {text}".strip()
        size = len(tokenizer(current).input_ids)
        if size > high:
            current = ""  # overshot: start the next note afresh
        elif size >= low:
            notes.append(current)
            current = ""
        if len(notes) == count:
            return notes
    raise ValueError(f"cannot join the sample notes into notes of {low}-{high} tokens")


def parameter_split(model: FusionModel) -> dict[str, int]:
    """Parameter counts: total, and by part (image tower, text tower, fusion + heads)."""
    split = {"image": 0, "text": 0, "fusion_heads": 0}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        tower = next((t for t in TOWERS if top in (f"{t}_encoder", f"missing_{t}")), None)
        split[tower or "fusion_heads"] += param.numel()
    return {"total": sum(split.values()), **split}


def cpu_flash_attention_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of SDPA's CPU kernel, which FlopCounterMode does not count: QK^T, then AV."""
    b, h, s_q, d = q
    return 2 * b * h * s_q * k[2] * d + 2 * b * h * s_q * k[2] * v[3]


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (convolutions, matmuls, attention), SDPA's CPU kernel included."""
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops}
    return FlopCounterMode(display=False, custom_mapping=extra)


def count_flops(model: FusionModel, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """FLOPs of one forward over the batch: total and by part (conv, matmul and attention)."""
    with flop_counter() as counter:
        model(*inputs)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root, total = type(model).__name__, counter.get_total_flops()
    image = by_module.get(f"{root}.image_encoder", 0)
    text = by_module.get(f"{root}.text_encoder", 0)
    return {"total": total, "image": image, "text": text, "fusion_heads": total - image - text}


def time_forward(
    model: FusionModel, inputs: tuple[torch.Tensor, ...], repeats: int, max_seconds: float
) -> tuple[list[float], float]:
    """Seconds per forward (2 warm-up calls, then `repeats`, at least 3 if time runs out), and
    the cores other processes kept busy meanwhile (contention: the machine is shared)."""
    return time_calls(lambda: model(*inputs), inputs[0].is_cuda, repeats, max_seconds)


def time_calls(
    call: Callable[[], Any], cuda: bool, repeats: int, max_seconds: float
) -> tuple[list[float], float]:
    """`time_forward` for any call (a part of the model alone)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        call()
    times: list[float] = []
    machine_before, own_before = cpu_seconds()
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < max_seconds):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    machine_after, own_after = cpu_seconds()
    others = (machine_after - machine_before) - (own_after - own_before)
    return times, max(others, 0.0) / (time.perf_counter() - started)


def part_seconds(
    model: FusionModel, inputs: tuple[torch.Tensor, ...], repeats: int, max_seconds: float
) -> dict[str, float]:
    """Median seconds of the image tower and the note tower alone on the same inputs."""
    image, ids, mask = inputs[:3]
    calls = {
        "image": model.image_encoder and (lambda: model.image_encoder(image)),
        "text": model.text_encoder and (lambda: model.text_encoder(ids, mask)),
    }
    return {
        part: statistics.median(time_calls(call, image.is_cuda, repeats, max_seconds)[0])
        if call
        else 0.0
        for part, call in calls.items()
    }


def measure(
    name: str,
    mode: str,
    batch: int,
    repeats: int,
    max_seconds: float,
    device: str,
    plain: bool = False,
) -> dict[str, Any]:
    """Build one model, then its parameters, FLOPs, latency and memory at one batch size; as
    inference runs it, or `plain` (default memory layout and allocator) for comparison."""
    if not plain:
        reuse_freed_memory()  # as every clinfuse command does
    after_imports = rss_mb()
    torch.manual_seed(0)
    pairs = training_notes(list(load_manifest(MANIFEST, labels=LABELS)))  # (patient, note)
    notes = [note for _, note in pairs]
    cfg = model_config(name, labels=LABELS, fusion={"mode": mode})
    model = create_model(cfg, notes=pairs).eval()  # the tokenizer as `clinfuse train` makes it
    if model.image_encoder is not None and not plain:
        model.image_encoder.channels_last()  # the layout `load_checkpoint` gives for inference
    texts = realistic_notes(model, notes, batch)
    enc = model.note_tokenizer(texts)
    image = torch.randn(batch, cfg.image.in_channels, *cfg.preprocess.spatial_size)
    present = torch.ones(batch, dtype=torch.bool)
    inputs = (image, enc.input_ids, enc.attention_mask, present, enc.note_present)
    model, inputs = model.to(device), tuple(t.to(device) for t in inputs)
    built = rss_mb()
    with torch.inference_mode():
        times, other_cores = time_forward(model, inputs, repeats, max_seconds)
        parts = part_seconds(model, inputs, repeats, max_seconds)
    peak_rss = rss_mb("VmHWM") - after_imports
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    # after the memory peak is read, and not under inference mode: the counter's module tracker
    # hooks every tensor that requires grad, and a parameter used directly (label attention's
    # queries) has no graph there
    flops = count_flops(model, inputs)
    median = statistics.median(times)
    return {
        "model": name,
        "mode": mode,
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "parameters": parameter_split(model),
        "vocab": len(model.note_tokenizer.tokenizer),
        "note_tokens": {
            "real_mean": float(enc.attention_mask.sum(1).float().mean()),
            "padded": enc.input_ids.shape[1],
        },
        "image_tokens": model.image_encoder.num_tokens if model.image_encoder is not None else 0,
        "flops_per_study": {part: n / batch for part, n in flops.items()},
        "repeats": len(times),
        "seconds": {"median": median, "min": min(times), "max": max(times)},
        "studies_per_s": batch / median,
        # each tower alone, timed like the whole; fusion + heads: the whole's median less theirs
        "seconds_by_part": {**parts, "fusion_heads": max(median - sum(parts.values()), 0.0)},
        "achieved_gflops": flops["total"] / median / 1e9,
        "rss_mb": {"after_imports": after_imports, "model_built": built - after_imports},
        "peak_rss_mb": peak_rss,
        "peak_cuda_mb": peak_cuda,
        "other_processes_cores": other_cores,
    }


# -- the run: machine peak, one subprocess per measurement, report --------------------------
def matmul_peak_gflops(device: str, size: int = 2048, rounds: int = 10) -> float:
    """fp32 GFLOP/s of the fastest of `rounds` `size`x`size` torch.matmul calls."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(rounds + 1):  # the first call warms up
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(**spec)` in a fresh Python process; its result is the last line of stdout."""
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads())]
    command += ["--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict[str, Any]:
    """CPU model (Linux /proc/cpuinfo), cores, GPU, torch and its threads, clinfuse commit."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:  # read-only queries
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True).stdout

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "clinfuse_commit": git("rev-parse", "--short", "HEAD").strip(),
        "clinfuse_uncommitted_changes": bool(git("diff", "--stat", "HEAD", "--", "clinfuse")),
    }


def run(
    models: list[str], batches: list[int], repeats: int, max_seconds: float, device: str
) -> dict[str, Any]:
    """Every case at every batch size, each in its own subprocess, between two peak runs."""
    cases = [
        (m, mode) for m in models for mode in (FUSION_MODES if m == "small" else FUSION_MODES[:1])
    ]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    setup = machine(device)  # the clinfuse commit as the run starts
    peak_before = matmul_peak_gflops(device)
    rows = []
    for name, mode in cases:
        for batch in batches:
            spec = dict(name=name, mode=mode, batch=batch, repeats=repeats)
            spec |= {"max_seconds": max_seconds, "device": device}
            plain = run_in_subprocess({**spec, "plain": True})  # then as inference runs it
            row = run_in_subprocess(spec)
            row["plain"] = {k: plain[k] for k in ("seconds", "studies_per_s", "peak_rss_mb")}
            print(
                f"{name:>12} {mode:<15} b{batch:<3} {row['seconds']['median'] * 1e3:9.1f} ms "
                f"(plain {plain['seconds']['median'] * 1e3:.1f} ms)"
            )
            rows.append(row)
    peak_after = matmul_peak_gflops(device)
    peak = max(peak_before, peak_after)
    for row in rows:
        row["share_of_peak"] = row["achieved_gflops"] / peak
    return {
        "date": started,
        "command": shlex.join(["python", "pipelines/bench_model.py", *sys.argv[1:]]),
        "machine": setup,
        "matmul_peak_gflops": {"best": peak, "before": peak_before, "after": peak_after},
        "results": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    """The setup, then two tables: size and cost per study; speed and memory per batch size."""
    m, peak = results["machine"], results["matmul_peak_gflops"]
    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in sorted(results["results"], key=lambda r: r["batch"]):  # stable: keeps case order
        cases.setdefault((r["model"], r["mode"]), []).append(r)
    per = "/".join(f"b{r['batch']}" for r in next(iter(cases.values())))
    dirty = " + uncommitted changes" if m["clinfuse_uncommitted_changes"] else ""
    lines = [
        f"`{results['command']}`, {results['date']}, clinfuse {m['clinfuse_commit']}{dirty}",
        "",
        f"{m['cpu']} ({m['cpu_capability']}), {m['cores']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} threads{', ' + m['gpu'] if m['gpu'] else ''}. fp32 matmul peak "
        f"{peak['best']:.0f} GFLOP/s (2048x2048; {peak['before']:.0f} before the models, "
        f"{peak['after']:.0f} after).",
        "",
        f"| model | fusion | params M | image / text / fusion+heads M | note tokens real, padded "
        f"{per} | image tokens | GFLOP / study {per} | FLOPs image / text / fusion+heads |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, mode), rs in cases.items():
        p, f = rs[-1]["parameters"], rs[-1]["flops_per_study"]
        cells = [
            f"{p['total'] / 1e6:.2f}",
            " / ".join(f"{p[k] / 1e6:.2f}" for k in ("image", "text", "fusion_heads")),
            f"{rs[-1]['note_tokens']['real_mean']:.0f}, "
            + "/".join(str(r["note_tokens"]["padded"]) for r in rs),
            str(rs[-1]["image_tokens"]),
            " / ".join(f"{r['flops_per_study']['total'] / 1e9:.3f}" for r in rs),
            " / ".join(
                f"{100 * f[k] / f['total']:.0f}%" for k in ("image", "text", "fusion_heads")
            ),
        ]
        lines.append(f"| {name} | {mode} | {' | '.join(cells)} |")
    columns = {
        "ms": lambda r: f"{r['seconds']['median'] * 1e3:.1f}",
        "min ms": lambda r: f"{r['seconds']['min'] * 1e3:.1f}",
        "studies/s": lambda r: f"{r['studies_per_s']:.1f}",
        "GFLOP/s": lambda r: f"{r['achieved_gflops']:.1f}",
        "% of peak": lambda r: f"{100 * r['share_of_peak']:.1f}",
        "% time image:text:fusion+heads": lambda r: (
            ":".join(
                f"{100 * r['seconds_by_part'][k] / r['seconds']['median']:.0f}"
                for k in ("image", "text", "fusion_heads")
            )
            if "seconds_by_part" in r
            else "n/a"
        ),
        "peak RSS MB": lambda r: f"{r['peak_rss_mb']:.0f}",
        "repeats": lambda r: str(r["repeats"]),
        "other load, cores": lambda r: f"{r['other_processes_cores']:.1f}",
    }
    plain = {
        "studies/s plain": lambda r: f"{r['plain']['studies_per_s']:.1f}",
        "studies/s as inference runs": lambda r: f"{r['studies_per_s']:.1f}",
        "speed-up": lambda r: f"{r['studies_per_s'] / r['plain']['studies_per_s']:.2f}x",
        "peak RSS MB plain": lambda r: f"{r['plain']['peak_rss_mb']:.0f}",
    }
    for table in (columns, plain):  # one row a case, each cell its batch sizes' values
        lines += ["", "| model | fusion | " + " | ".join(f"{c} {per}" for c in table) + " |"]
        lines.append("|---|---|" + "---:|" * len(table))
        for (name, mode), rs in cases.items():
            cells = [" / ".join(cell(r) for r in rs) for cell in table.values()]
            lines.append(f"| {name} | {mode} | {' | '.join(cells)} |")
    lines += [
        "",
        "Plain: each model in its default memory layout under glibc's default allocator settings, "
        "measured in a fresh process just before the same case as inference runs it (the image "
        "trunk channels-last, `clinfuse.allocator.reuse_freed_memory`).",
        "",
        "Time by part: the image tower and the note tower each timed alone on the same inputs "
        "(median), fusion + heads the whole forward's median less theirs.",
        "",
        "Latency: median (and fastest) forward after 2 warm-up calls; eval mode, "
        "`torch.inference_mode()`, the image trunk channels-last (as `load_checkpoint` lays it out "
        "for inference), all images and notes present. FLOPs: "
        "`torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls, attention; a "
        "multiply-add is 2 FLOPs) at each batch size, per study. Peak RSS: high-water RSS (VmHWM) "
        "of a fresh process minus its RSS after imports (model, tokenizer, activations). Other "
        "load: CPU time used by everything else on the machine (hypervisor steal included) per "
        "second of the timed loop; the machine is shared, so trust rows whose other load is ~0.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_models()), help="comma-separated")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per measurement")
    parser.add_argument(
        "--max-seconds", type=float, default=6.0, help="stop timing after this (min 3 repeats)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/model"), help="<out>.json/md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement as JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    models = args.models.split(",")
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {', '.join(list_models())}")
    batches = [int(b) for b in args.batches.split(",")]
    results = run(models, batches, args.repeats, args.max_seconds, args.device)
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_atomic(md_path, markdown(results))
    print(markdown(results) + f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
