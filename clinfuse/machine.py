"""The machine a measurement ran on, as the benchmark tables name it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows of it."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def describe_machine() -> str:
    """The machine in one line: CPU, CPU count, torch threads, the GPU if any, torch."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads{gpu}, "
        f"torch {torch.__version__}"
    )
