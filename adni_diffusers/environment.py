"""What ran a stage: software versions and the device, recorded beside a model (training_args.json, evaluation's
metrics.json) so that a paper's Methods, a rerun and the model card can name them. No path, user or host name."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = ("adni-diffusers", "diffusers", "accelerate", "datasets", "huggingface_hub", "torchmetrics")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The package's git commit where it runs from a checkout (an editable install), "+changes" when the checkout
    differs from it; None otherwise (a wheel) or where git is missing."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device | str) -> str:
    """"NVIDIA H100 80GB HBM3" for a CUDA device; the CPU's model name and core count otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {model}, {os.cpu_count()} cores"


def environment(device: torch.device | str) -> dict:
    """Versions of Python, torch (and its CUDA) and the libraries the package builds on, the package's own version
    and commit, and the device (the number of processes is recorded beside it where there are several); and
    torch's CPU thread count, which changes float sums and so the bits of what a CPU run trains or samples (two
    CPU runs of one seed matched bit for bit at one thread count, not across 1 and 2 threads)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name.replace("-", "_"): _version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "device": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
