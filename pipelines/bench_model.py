"""Benchmark every registered architecture's forward pass: parameters, FLOPs, latency, memory.

    python pipelines/bench_model.py [--models a,b] [--batches 1,16] [--repeats N]
                                    [--max-seconds S] [--device cpu|cuda] [--out benchmarks/model]

Each registered model runs in its default `cross_attention` mode, and `small` in all four
fusion modes, in eval mode under `torch.inference_mode()`, with every image present and notes
of 60-100 tokens (consecutive sample notes joined). Every (model, batch) runs in a fresh
subprocess so its peak memory is its own. The machine's fp32 matmul peak is measured in the
same run (before and after the models), so the share of peak is a ratio within one run.
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from clinfuse.model import FusionModel, create_model, list_models, model_config

NOTES = Path(__file__).resolve().parents[1] / "sample_data" / "notes"
LABELS = ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass")
FUSION_MODES = ("cross_attention", "late", "image_only", "text_only")
PARTS = {"image_encoder": "image", "missing_image": "image", "text_encoder": "text"}
PARTS["missing_text"] = "text"  # everything else (fusion, pool, head) is "fusion_heads"


# -- one (model, batch) measurement, run in its own subprocess ------------------------------
def rss_mb() -> float:
    """This process's current resident set size (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
        split[PARTS.get(name.split(".")[0], "fusion_heads")] += param.numel()
    return {"total": sum(split.values()), **split}


def cpu_flash_attention_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of SDPA's CPU kernel, which FlopCounterMode does not count: QK^T, then AV."""
    b, h, s_q, d = q
    return 2 * b * h * s_q * k[2] * d + 2 * b * h * s_q * k[2] * v[3]


def count_flops(model: FusionModel, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """FLOPs of one forward over the batch: total and by part (conv, matmul and attention)."""
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model(*inputs)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root, total = type(model).__name__, counter.get_total_flops()
    image = by_module.get(f"{root}.image_encoder", 0)
    text = by_module.get(f"{root}.text_encoder", 0)
    return {"total": total, "image": image, "text": text, "fusion_heads": total - image - text}


def time_forward(
    model: FusionModel, inputs: tuple[torch.Tensor, ...], repeats: int, max_seconds: float
) -> list[float]:
    """Seconds per forward: 2 warm-up calls, then `repeats` calls (at least 3 if time runs out)."""
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    for _ in range(2):
        model(*inputs)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < max_seconds):
        sync()
        t0 = time.perf_counter()
        model(*inputs)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def measure(
    name: str, mode: str, batch: int, repeats: int, max_seconds: float, device: str
) -> dict[str, Any]:
    """Build one model, then its parameters, FLOPs, latency and memory at one batch size."""
    after_imports = rss_mb()
    torch.manual_seed(0)
    notes = [p.read_text(encoding="utf-8") for p in sorted(NOTES.glob("*.txt"))]
    cfg = model_config(name, labels=LABELS, fusion={"mode": mode})
    model = create_model(cfg, notes=notes).eval()
    texts = realistic_notes(model, notes, batch)
    enc = model.note_tokenizer(texts)
    image = torch.randn(batch, cfg.image.in_channels, *cfg.preprocess.spatial_size)
    present = torch.ones(batch, dtype=torch.bool)
    inputs = (image, enc.input_ids, enc.attention_mask, present, enc.note_present)
    model, inputs = model.to(device), tuple(t.to(device) for t in inputs)
    built = rss_mb()
    with torch.inference_mode():
        flops = count_flops(model, inputs)
        times = time_forward(model, inputs, repeats, max_seconds)
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
        "achieved_gflops": flops["total"] / median / 1e9,
        "rss_mb": {"after_imports": after_imports, "model_built": built - after_imports},
        "peak_rss_mb": peak_rss_mb() - after_imports,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "matmul_gflops_after": matmul_peak_gflops(device, rounds=3, per_round=1),  # contention
    }


# -- the run: machine peak, one subprocess per measurement, report --------------------------
def matmul_peak_gflops(device: str, size: int = 2048, rounds: int = 5, per_round: int = 3) -> float:
    """Best-of-`rounds` fp32 GFLOP/s of `size`x`size` torch.matmul (default thread count)."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(per_round):
            torch.matmul(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / per_round)
    return 2 * size**3 / best / 1e9


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(**spec)` in a fresh Python process; its result is the last line of stdout."""
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def git(*args: str) -> str:
    """Read-only git query in this repository ("" when git is unavailable)."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return done.stdout.strip()


def machine(device: str) -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor() or platform.machine(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "clinfuse_commit": git("rev-parse", "--short", "HEAD"),
        "clinfuse_uncommitted_changes": bool(git("diff", "--stat", "HEAD", "--", "clinfuse")),
        "python": platform.python_version(),
    }


def run(
    models: list[str], batches: list[int], repeats: int, max_seconds: float, device: str
) -> dict[str, Any]:
    """Every case at every batch size, each in its own subprocess, between two peak runs."""
    cases = [
        (m, mode) for m in models for mode in (FUSION_MODES if m == "small" else FUSION_MODES[:1])
    ]
    peak_before = matmul_peak_gflops(device)
    rows = []
    for name, mode in cases:
        for batch in batches:
            spec = dict(name=name, mode=mode, batch=batch, repeats=repeats)
            row = run_in_subprocess({**spec, "max_seconds": max_seconds, "device": device})
            print(
                f"{name:>12} {mode:<15} batch {batch:>3}: {row['seconds']['median'] * 1e3:9.1f} ms"
            )
            rows.append(row)
    peak_after = matmul_peak_gflops(device)
    peak = max(peak_before, peak_after, *(row["matmul_gflops_after"] for row in rows))
    for row in rows:
        row["share_of_peak"] = row["achieved_gflops"] / peak
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "pipelines/bench_model.py", *sys.argv[1:]]),
        "machine": machine(device),
        "matmul_peak_gflops": {"best": peak, "before": peak_before, "after": peak_after},
        "results": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    m, peak = results["machine"], results["matmul_peak_gflops"]
    rows = {(r["model"], r["mode"], r["batch"]): r for r in results["results"]}
    cases = list(dict.fromkeys((r["model"], r["mode"]) for r in results["results"]))
    batches = sorted({r["batch"] for r in results["results"]})
    per_batch = "/".join(f"b{b}" for b in batches)
    dirty = " + uncommitted changes" if m["clinfuse_uncommitted_changes"] else ""
    lines = [
        f"`{results['command']}`, {results['date']}, clinfuse {m['clinfuse_commit']}{dirty}",
        "",
        f"{m['cpu']} ({m['cpu_capability']}), {m['cores']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} threads{', ' + m['gpu'] if m['gpu'] else ''}. fp32 matmul peak "
        f"{peak['best']:.0f} GFLOP/s (2048x2048, best of the run; {peak['before']:.0f} before "
        f"the models, {peak['after']:.0f} after).",
        "",
        f"| model | fusion | params M | image / text / fusion+heads M | note tokens real, "
        f"padded {per_batch} | image tokens | GFLOP / study {per_batch} "
        f"| FLOPs image / text / fusion+heads (b{batches[-1]}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mode in cases:
        rs = [rows[(name, mode, b)] for b in batches]
        r = rs[-1]
        p, f = r["parameters"], r["flops_per_study"]
        padded = "/".join(str(r["note_tokens"]["padded"]) for r in rs)
        gflops = " / ".join(f"{r['flops_per_study']['total'] / 1e9:.3f}" for r in rs)
        lines.append(
            f"| {name} | {mode} | {p['total'] / 1e6:.2f} | {p['image'] / 1e6:.2f} / "
            f"{p['text'] / 1e6:.2f} / {p['fusion_heads'] / 1e6:.2f} "
            f"| {r['note_tokens']['real_mean']:.0f}, {padded} "
            f"| {r['image_tokens']} | {gflops} | "
            + " / ".join(
                f"{100 * f[k] / f['total']:.0f}%" for k in ("image", "text", "fusion_heads")
            )
            + " |"
        )
    head = [f"{what} b{b}" for what in ("ms", "studies/s", "GFLOP/s (% peak)") for b in batches]
    head += [f"peak RSS MB b{b}" for b in batches]
    head += [f"repeats {'/'.join(f'b{b}' for b in batches)}", "matmul now, % of peak"]
    lines += ["", f"| model | fusion | {' | '.join(head)} |", "|---|---|" + "---:|" * len(head)]
    for name, mode in cases:
        rs = [rows[(name, mode, b)] for b in batches]
        cells = [f"{r['seconds']['median'] * 1e3:.1f}" for r in rs]
        cells += [f"{r['studies_per_s']:.1f}" for r in rs]
        cells += [f"{r['achieved_gflops']:.1f} ({100 * r['share_of_peak']:.0f}%)" for r in rs]
        cells += [f"{r['peak_rss_mb']:.0f}" for r in rs]
        cells += [" / ".join(str(r["repeats"]) for r in rs)]
        cells += [" / ".join(f"{100 * r['matmul_gflops_after'] / peak['best']:.0f}" for r in rs)]
        lines.append(f"| {name} | {mode} | {' | '.join(cells)} |")
    lines += [
        "",
        "Latency: median forward over the repeats after 2 warm-up calls, eval mode, "
        "`torch.inference_mode()`, all images and notes present. FLOPs: "
        "`torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls and attention; "
        "a multiply-add is 2 FLOPs), counted at batch 1 and 16 and divided per study. Peak RSS: "
        "`ru_maxrss` of a fresh process minus its RSS after imports (model, tokenizer, "
        "activations). Matmul now: the 2048x2048 matmul rerun right after each measurement, "
        "as % of the run's peak; well under 100% means another process shared the cores.",
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/model"), help="<out>.json/md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement as JSON
    args = parser.parse_args()
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
