#!/usr/bin/env python
"""Speed benchmarks for adni_diffusers: everything in ONE process on ONE device, side by side.

    python benchmarks/run.py                        # CUDA if present (base preset), else CPU (small preset)
    python benchmarks/run.py --device cuda --compile --out docs/bench-h100.json
    python benchmarks/run.py --device cpu --out cpu.json
    python benchmarks/run.py --smoke --device cpu   # seconds: what the tests run

Sections (each row says exactly what ran; nothing is extrapolated):

1. `unet`: one UNet training step, images/s. "example style" = what diffusers' training examples do
   (pixels -> VQ encode of every batch, fp32 (TF32 on CUDA), eager, plain AdamW, `loss.item()` per
   step) against our loop (cached latents, bf16 autocast on CUDA, channels_last, fused AdamW on CUDA,
   torch.compile with --compile, no per-step sync). Both call the package's own `diffusion_loss`,
   `make_optimizer`, `maybe_compile`, `to_channels_last`, `make_ema`, `LatentDataset` and
   `EpochShuffleSampler`, so the numbers describe the real training code. Model FLOP utilisation =
   images/s x (forward+backward FLOPs per image, counted by torch.utils.flop_counter; the example-style
   step's VQ encode included) / the matmul rate of the row's precision measured in this run (bf16 rows:
   bf16; fp32 rows: TF32 on CUDA; fp32 on CPU). Rows record which in `mfu_of`. The rate is measured at the
   start and at the end of the run (on CPU at several sizes) and the higher kept; an MFU above 100% is not
   reported (`mfu_invalid`: the peak was under-measured). "Ours" (summary `best_ours`) is the fastest row
   that train_unet can run with its own flags (no EMA, cached latents via the DataLoader); rows with settings
   no train_unet flag gives (inductor's forced layout optimization) are experiments and never "ours".
2. `latent_cache`: `latents.encode_all` images/s; `vq`: one VQ training step (`vq.VQTrainingModel`
   forward + reconstruction/codebook/commitment losses + backward + step + codebook-usage update).
3. `sampling`, two paths, images/s, per sampler and batch size, with random weights (speed does not depend on
   them); rows are labelled with the number of steps actually run:
   - "pipeline call": `ADNILatentDiffusionPipeline.__call__(output_type="pt")` (UNet steps + VQ decode), one
     device generator, unconditional, images left on the device, no PNG;
   - "generate": `adni_diffusers.generate.generate(...)`, what `adni-diffusers generate` runs: one CPU generator
     per image (DDPM draws each step's noise on the CPU and copies it over), images to uint8 and one PNG each
     (plus grid.png and generation.json) in a temporary folder; unconditional, and a class-conditional UNet with
     `--class AD` (guidance 2: the UNet runs on twice the batch), at --generate-batch-sizes.
4. `cpu_goal` (CPU only): 4 images with DPM-Solver++-25 from a saved pipeline (load + sample), wall time, per
   preset in --cpu-goal-presets (`base`: the models the product trains; `small` for comparison).

A Markdown table goes to stdout; the JSON (machine, versions, date, command, every row) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from adni_diffusers.training import COMPILE_MODES  # noqa: E402

SECTIONS = ("unet", "latent_cache", "vq", "sampling", "cpu_goal")
SAMPLERS = ("ddpm", "dpm++", "unipc")

# Defaults per device. CPU sizes keep the whole default run to a few minutes on 2 cores.
DEFAULTS = {
    "cuda": dict(preset="base", batch_sizes=[128, 256, 512], vq_batch_sizes=[32, 64], sample_batch_sizes=[64, 256, 512],
                 encode_images=2048, encode_batch_sizes=[16, 256], steps=30, warmup=10, repeats=3, ddpm_steps=1000,
                 sample_repeats=3, matmul_size=8192),
    "cpu": dict(preset="small", batch_sizes=[8, 16], vq_batch_sizes=[4], sample_batch_sizes=[4, 16],
                encode_images=32, encode_batch_sizes=[16], steps=5, warmup=1, repeats=3, ddpm_steps=50,
                sample_repeats=3, matmul_size=1024),  # 3 repeats: one block shows no spread
    "smoke": dict(preset="tiny", batch_sizes=[2], vq_batch_sizes=[2], sample_batch_sizes=[2], encode_images=4,
                  encode_batch_sizes=[2], steps=1, warmup=1, repeats=2, ddpm_steps=2, sample_repeats=1, matmul_size=128,
                  threads=1),
}
DEFAULTS["cuda"].update(generate_batch_sizes=[256], cpu_goal_presets=[])  # 256: generate's batch on CUDA
DEFAULTS["cpu"].update(generate_batch_sizes=[4], cpu_goal_presets=["small", "base"])  # base: the product's models
DEFAULTS["smoke"].update(generate_batch_sizes=[2], cpu_goal_presets=["tiny"])
GENERATE_CLASS = "AD"  # the class the conditional generate rows sample, with generate's default guidance (2)
SMOKE_SOLVER_STEPS = 2  # --smoke runs DPM-Solver++ / UniPC with 2 steps (labelled so)

# Issue 7's goals: (key, what, threshold, unit, higher_is_better, device)
GOALS = [
    ("unet_images_per_s", "UNet training, base preset, images/s", 6000, "images/s", True, "cuda"),
    ("unet_speedup", "UNet training speed-up over the example-style step", 17, "x", True, "cuda"),
    ("unet_mfu", "UNet training model FLOP utilisation", 0.36, "of bf16 rate", True, "cuda"),
    ("vq_images_per_s", "VQ training, default (base) preset, images/s", 400, "images/s", True, "cuda"),
    ("ddpm1000_images_per_s", "DDPM-1000 sampling end to end, images/s", 10, "images/s", True, "cuda"),
    ("fast_sampler_images_per_s", "<= 25-step sampler end to end, images/s", 200, "images/s", True, "cuda"),
    ("adni_training_minutes", "ADNI-size (30,520 images) VQ + UNet training, minutes", 30, "min", False, "cuda"),
    ("cpu_4_images_25_steps_s", "CPU: 4 images, 25-step sampler, base preset (the product's models), seconds", 60,
     "s", False, "cpu"),
]
CPU_GOAL_PRESET = "base"  # the goal is judged on the models the product trains; other presets are for comparison


# ------------------------------------------------------------------------------------------ helpers


class Bench:
    """Device, synchronisation, peak memory, FLOP rate, and the rows collected so far."""

    def __init__(self, device: torch.device, partial_path: Path | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.cuda_broken: str | None = None  # a sticky CUDA error ends all later GPU work
        # every finished row is also written here at once, so a run killed by a time limit keeps its rows
        self.partial_path = partial_path
        self.finished_rows: list[dict] = []
        self.section: str | None = None
        self.header: dict = {}  # machine, settings, matmul rate, FLOPs: what makes a partial record readable alone

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- memory: CUDA allocator peak, or the process's peak RSS (VmHWM, reset via /proc/self/clear_refs)
    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def memory_kind(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "process peak RSS (VmHWM, reset per row)"

    def count_syncs(self, fn) -> int | None:
        """Host-device synchronisations during fn() (CUDA only), via torch.cuda.set_sync_debug_mode."""
        if not self.cuda:
            return None
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        self.sync()
        return sum("synchroniz" in str(w.message) for w in caught)

    def guarded(self, row: dict, fn) -> dict:
        """Run fn(row) -> row; record an error instead of stopping the whole benchmark."""
        if self.cuda_broken:
            row["error"] = f"skipped: the CUDA context was lost earlier ({self.cuda_broken})"
            return row
        load_before = load_average_1min()
        try:
            fn(row)
        except Exception as e:  # noqa: BLE001 - a benchmark row fails, the run goes on
            msg = short_error(e)
            row["error"] = msg[:500]
            print(f"[benchmark] row {row.get('name')} failed: {msg}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
            if self.cuda and ("CUDA error" in str(e) or "cudaError" in str(e) or "illegal" in str(e).lower()):
                self.cuda_broken = f"{row.get('name')}: {msg[:120]}"
        finally:
            gc.collect()
            if self.cuda and not self.cuda_broken:
                torch.cuda.empty_cache()
        # other work on the machine slows a row: say how busy it was around this one
        row["load_average_1min"] = [load_before, load_average_1min()]
        self.finished_rows.append({"section": self.section, **row})
        if self.partial_path:  # written whole, then renamed: a reader never sees half a file
            tmp = self.partial_path.with_name(self.partial_path.name + ".tmp")
            record = {"partial": True, **self.header, "rows": self.finished_rows}
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
            os.replace(tmp, self.partial_path)
        return row


def load_average_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _matmul_seconds(bench: Bench, a: torch.Tensor, b: torch.Tensor, iters: int, repeats: int) -> list[float]:
    """3 untimed products, then `repeats` blocks of `iters` products, each between two device syncs: seconds per
    block (the best one is the rate: a slower block is the card waiting, not its speed)."""
    for _ in range(3):
        a @ b
    bench.sync()
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        bench.sync()
        blocks.append(time.perf_counter() - t0)
    return blocks


def matmul_sizes(n: int, cuda: bool) -> list[int]:
    """CUDA: n. CPU: n/2, n and 2n, since the fastest size depends on the CPU's caches and one size under-measured
    the peak (a row then showed 104% MFU)."""
    return [n] if cuda else sorted({max(16, n // 2), n, 2 * n})


def matmul_rate(bench: Bench, n: int, repeats: int = 3, sizes: list[int] | None = None) -> dict:
    """The device's measured dense matmul rate: bf16 on CUDA, fp32 on CPU (no bf16 hardware assumed), the best of
    `sizes` (default: n). On CUDA also the TF32 rate (the fp32 rows' MFU denominator), measured the same way
    (until 2026-12-04 it was one block after one warm-up product: a slow block lowered the rate and raised every
    fp32 row's MFU)."""
    tried = [_matmul_rate_at(bench, size, repeats) for size in sizes or [n]]
    out = dict(max(tried, key=lambda m: m["flops_per_s"]))
    if bench.cuda and len(tried) > 1:
        out["tf32_tflops"] = max(m["tf32_tflops"] for m in tried)
    out["sizes_tried"] = {m["size"]: round(m["tflops"] * 1000, 1) for m in tried}  # GFLOP/s per size
    return out


def _matmul_rate_at(bench: Bench, n: int, repeats: int) -> dict:
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    iters = 50 if bench.cuda else max(2, min(20, int(2e10 / (2 * n**3))))
    blocks = _matmul_seconds(bench, a, b, iters, repeats)
    rate = 2 * n**3 * iters / min(blocks)
    out = {"dtype": str(dtype).replace("torch.", ""), "size": n, "flops_per_s": rate, "tflops": rate / 1e12,
           "threads": torch.get_num_threads(), "iters": iters, "seconds_per_block": [round(x, 6) for x in blocks]}
    if bench.cuda:  # also the TF32 rate, for the fp32 rows
        tf32_blocks = _matmul_seconds(bench, a.float(), b.float(), iters, repeats)
        out["tf32_tflops"] = 2 * n**3 * iters / min(tf32_blocks) / 1e12
        out["tf32_seconds_per_block"] = [round(x, 6) for x in tf32_blocks]
    return out


def keep_higher(start: dict, end: dict) -> dict:
    """The run's MFU denominators: per precision the higher of the rates measured at the start and at the end (a
    lower one is the device busy with other work, not its peak). Both measurements are kept."""
    kept = start if start["flops_per_s"] >= end["flops_per_s"] else end
    out = {k: v for k, v in kept.items() if not k.startswith("tf32")}
    out["kept"] = "start" if kept is start else "end"
    if "tf32_tflops" in start:
        out["tf32_tflops"] = max(start["tf32_tflops"], end["tf32_tflops"])
        out["tf32_kept"] = "start" if start["tf32_tflops"] >= end["tf32_tflops"] else "end"
    out["start"], out["end"] = start, end
    return out


class Rates:
    """The MFU denominators measured in this run: each row is divided by the matmul rate of the precision it ran
    in (bf16 rows by the bf16 rate, fp32 rows by the TF32 rate on CUDA; everything by the fp32 rate on CPU)."""

    def __init__(self, matmul: dict, cuda: bool):
        self.cuda, self.bf16 = cuda, matmul["flops_per_s"]
        self.fp32 = matmul["tf32_tflops"] * 1e12 if cuda else matmul["flops_per_s"]

    def of(self, bf16: bool) -> tuple[float, str]:
        if not self.cuda:
            return self.fp32, "fp32"
        return (self.bf16, "bf16") if bf16 else (self.fp32, "tf32")

    def mfu(self, row: dict, flops_per_image: float, bf16: bool) -> None:
        """row["mfu"] from its images/s, and row["mfu_of"]: which rate it is a share of. The FLOPs are kept so
        that the MFU can be worked out again against the run's final rate (refresh)."""
        rate, name = self.of(bf16)
        row["flops_per_image"] = flops_per_image
        set_mfu(row, row["images_per_s"] * flops_per_image / rate, name)

    def refresh(self, row: dict) -> None:
        """The row's MFU against these rates (the higher of the start and end measurements)."""
        if "flops_per_image" in row and "images_per_s" in row:
            rate = self.bf16 if row["mfu_of"] == "bf16" else self.fp32
            set_mfu(row, row["images_per_s"] * row["flops_per_image"] / rate, row["mfu_of"])


def set_mfu(row: dict, mfu: float, rate_name: str) -> None:
    """An MFU above 100% means the measured peak was too low (the machine was busy while it was measured), not
    that the row beat it: such a row's MFU is not reported, only why."""
    row["mfu_of"] = rate_name
    if mfu > 1:
        row["mfu"] = None
        row["mfu_invalid"] = (f"{mfu:.0%} of the measured {rate_name} rate: invalid, the peak was under-measured "
                              "(a busy machine)")
    else:
        row["mfu"] = mfu
        row.pop("mfu_invalid", None)


def count_flops(fn) -> int:
    """FLOPs of fn() (matmuls, convolutions, attention) with torch.utils.flop_counter. SDPA runs on the
    math backend here so attention is counted on every device (CPU's fused kernel is not registered)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_info(bench: Bench, argv: list[str]) -> dict:
    import accelerate
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *argv]),
        "device": str(bench.device),
        "device_name": torch.cuda.get_device_name(bench.device) if bench.cuda else cpu_model(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def train_args(batch_size: int, **kw) -> SimpleNamespace:
    """The subset of train_unet/train_vqmodel flags the package's helpers read, with their defaults."""
    base = dict(learning_rate=1e-4, scale_lr=False, gradient_accumulation_steps=1, train_batch_size=batch_size,
                adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0,
                channels_last=False, compile=False, use_ema=False, ema_max_decay=0.9999, ema_inv_gamma=1.0,
                ema_power=3 / 4, logging_steps=10, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def autocast(bench: Bench, enabled: bool):
    """bf16 autocast as Accelerate's --mixed_precision bf16 applies it (CUDA only here: no bf16 CPU hardware)."""
    if enabled and bench.cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_slices(n: int, seed: int = 0):
    """n synthetic 256x256 uint8 slices in a SliceSet (speed does not depend on the pixels)."""
    from adni_diffusers.data import SliceSet

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 256, 256), dtype=torch.uint8, generator=g)
    return SliceSet(pixels, torch.randint(0, 2, (n,), generator=g), [f"p{i // 8}" for i in range(n)],
                    [f"synthetic_{i}.jpeg" for i in range(n)], ["AD", "NC"])


def cycle(loader):
    if len(loader) == 0:
        raise ValueError("the benchmark's data set is smaller than one batch")
    while True:
        yield from loader


def make_loader(dataset, batch_size: int, bench: Bench, package: bool = True):
    """package=True: the training scripts' own loader (`training.make_dataloader`: whole batches through
    `get_batch`, num_workers=0 as the flag's default). package=False: the example style, items fetched one
    by one and collated by torch's default collate, into unpinned memory: diffusers' train_unconditional builds
    its DataLoader without pin_memory, and Accelerate's prepare keeps it so (until 2026-12-04 this loader pinned
    on CUDA: with no worker, each batch's copy into pinned memory was on the example step's critical path)."""
    from adni_diffusers.training import EpochShuffleSampler, make_dataloader

    if package:
        args = SimpleNamespace(seed=0, train_batch_size=batch_size, dataloader_num_workers=0)
        return make_dataloader(dataset, args, SimpleNamespace(device=bench.device, num_processes=1))[0]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), 0),
                                       drop_last=True, num_workers=0, pin_memory=False)


def timed_loop(bench: Bench, step, steps: int, warmup: int, repeats: int = 1) -> dict:
    """warmup steps (untimed; training rows compiled earlier, in maybe_compile's probe), then `repeats`
    blocks of `steps` timed steps, each between two device syncs. The median block is reported, and the
    spread (max - min) / median says how far a difference between rows can be trusted."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    bench.sync()
    warm = time.perf_counter() - t0
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        bench.sync()
        per_step.append((time.perf_counter() - t0) / steps)
    median = statistics.median(per_step)
    return {"warmup_seconds": round(warm, 3), "seconds_per_step": median,
            "seconds_per_step_all": [round(x, 6) for x in per_step],
            "spread": (max(per_step) - min(per_step)) / median}


def short_error(e: BaseException) -> str:
    """The exception's type and first line, for a row's error fields."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def compile_failed(bench: Bench, row: dict, e: BaseException, compiled: bool) -> None:
    """A compiled row failed after maybe_compile's probe passed: re-raise what eager would not survive
    (not a compiled row, or a sticky CUDA error), else record it; the caller then measures eager."""
    if not compiled or bench.cuda and "CUDA error" in str(e):
        raise e
    row["compile_error"] = short_error(e)[:300]
    row["name"] += " [compile failed: eager]"
    fresh_compile_cache()


def timed_training_row(bench: Bench, row: dict, step, opts, compiled: bool, use_eager) -> dict:
    """timed_loop, and if the compiled step fails: use_eager() (swap in the eager model) and time again."""
    try:
        return timed_loop(bench, step, opts.steps, opts.warmup, opts.repeats)
    except Exception as e:  # noqa: BLE001
        compile_failed(bench, row, e, compiled)
        use_eager()
        return timed_loop(bench, step, opts.steps, opts.warmup, opts.repeats)


def finish_row(row: dict, batch_size: int, timing: dict, bench: Bench, flops_per_image: float | None,
               rates: Rates | None, bf16: bool) -> dict:
    row.update(timing)
    row["images_per_s"] = batch_size / timing["seconds_per_step"]
    row["peak_memory_mb"] = round(bench.peak_mb(), 1)
    if flops_per_image and rates:
        rates.mfu(row, flops_per_image, bf16)
    return row


def per_step_syncs(bench: Bench, step, n: int) -> float | None:
    """Host-device syncs per training step, averaged over one logging period (CUDA only)."""
    if not bench.cuda:
        return None
    count = bench.count_syncs(lambda: [step() for _ in range(n)])
    return None if count is None else count / n


def fresh_compile_cache():
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def compiled_words(spec: dict) -> str:
    if not spec["compile"]:
        return "eager"
    words = f"compiled (mode {spec['mode']})" if spec.get("mode") else "compiled"
    return words + (", inductor layout optimization forced" if spec.get("layout_opt") else "")


@contextlib.contextmanager
def row_settings(spec: dict):
    """A row's process-wide settings: cudnn.benchmark (--cudnn_benchmark), inductor's forced layout optimization,
    and its own compilation for a compile mode other than the default or a forced layout (so none of them leaks
    into the next row)."""
    import torch._inductor.config as inductor_config

    own_compile = bool(spec.get("mode") or spec.get("layout_opt"))
    if own_compile:
        fresh_compile_cache()
    torch.backends.cudnn.benchmark = bool(spec.get("cudnn"))
    forced_before = inductor_config.force_layout_optimization
    inductor_config.force_layout_optimization = bool(spec.get("layout_opt")) or forced_before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False
        inductor_config.force_layout_optimization = forced_before
        if own_compile:
            fresh_compile_cache()


def profiled_variants(opts, default_order, present) -> set[str]:
    """The rows --profile profiles (first batch size): --profile-variants where given, else the first of
    `default_order` present ("ours")."""
    if opts.profile_variants:
        return set(opts.profile_variants) & set(present)
    return {next((n for n in default_order if n in present), None)} - {None}


def profile_steps(bench: Bench, step, steps: int, top: int = 20) -> dict:
    """torch.profiler over `steps` more training steps: where the time goes. On CUDA, kernel time per step
    against wall time per step says whether the GPU waits for the host (busy fraction well below 1: launch
    or Python overhead) or is busy (then the top kernels say which work to make cheaper); kernel launches
    per step count what CUDA graphs would remove. On CPU: self CPU time per operator. The profiler adds
    its own overhead to the wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    bench.sync()
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        bench.sync()
        wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    events = prof.key_averages()
    key = "self_device_time_total" if bench.cuda else "self_cpu_time_total"
    time_of = lambda e: getattr(e, key, None) or getattr(e, key.replace("device", "cuda"), 0) or 0  # noqa: E731
    # GPU time: the kernels' own events only, as torch's table sums it (the CPU op that launched a kernel carries
    # that kernel's time too: summing both counted it twice)
    timed = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation] if bench.cuda \
        else list(events)
    busy_us = sum(time_of(e) for e in timed)
    # runtime (cudaLaunchKernel*) and driver (cuLaunchKernel*, Triton's kernels) launches, Ex variants included
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    graph_launches = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    ranked = sorted(timed, key=time_of, reverse=True)[:top]
    return {
        "steps": steps, "timed_by": "CUDA kernel time" if bench.cuda else "self CPU time",
        "wall_ms_per_step": wall * 1000 / steps,
        "busy_ms_per_step": busy_us / 1000 / steps,
        "busy_fraction": (busy_us / 1e6) / wall if bench.cuda else None,
        "kernel_launches_per_step": launches / steps if bench.cuda else None,
        "cuda_graph_launches_per_step": graph_launches / steps if bench.cuda else None,
        "top": [{"name": e.key[:160], "ms_per_step": time_of(e) / 1000 / steps, "calls_per_step": e.count / steps,
                 "share": time_of(e) / busy_us if busy_us else None} for e in ranked if time_of(e) > 0],
        "copies": copy_sources(prof.events(), time_of, steps),
    }


# what asks for a copy without being its reason: look past these to the operator that needed it
_COPY_WRAPPERS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::reshape",
                  "aten::type_as", "aten::_copy_from", "aten::_copy_from_and_resize"}


def _copy_caller(event) -> str:
    parent = event.cpu_parent
    while parent is not None and parent.name in _COPY_WRAPPERS:
        parent = parent.cpu_parent
    if parent is None:
        return "(no operator: Python or autograd)"
    if "CompiledFxGraph" in parent.name:  # "## Call CompiledFxGraph <hash> ##": inductor's compiled code
        return "a torch.compile graph (inductor)"
    return parent.name[:120]


def copy_sources(events, time_of, steps: int, top: int = 10) -> list[dict]:
    """`aten::copy_` (layout, dtype and device copies) grouped by the operator that asked for it: a
    convolution backward copying its gradient into the layout cuDNN wants, the optimizer, autocast, the
    compiled graph... with the time of the copy's own kernels and its most common input shape and dtype."""
    groups: dict[str, dict] = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        g = groups.setdefault(_copy_caller(e), {"calls": 0, "us": 0.0, "inputs": {}})
        g["calls"] += 1
        g["us"] += time_of(e)
        shapes, dtypes = getattr(e, "input_shapes", None) or [], getattr(e, "input_dtypes", None) or []
        what = f"{list(shapes[1]) if len(shapes) > 1 else '?'} {dtypes[1] if len(dtypes) > 1 else ''} -> " \
               f"{list(shapes[0]) if shapes else '?'} {dtypes[0] if dtypes else ''}"  # copy_(self, src)
        g["inputs"][what] = g["inputs"].get(what, 0) + 1
    ranked = sorted(groups.items(), key=lambda kv: (kv[1]["us"], kv[1]["calls"]), reverse=True)[:top]
    return [{"called_from": name, "calls_per_step": g["calls"] / steps, "ms_per_step": g["us"] / 1000 / steps,
             "most_common": max(g["inputs"], key=g["inputs"].get)} for name, g in ranked]


# ---------------------------------------------------------------------------------- 1. UNet training


def effective_config(spec: dict, bench: Bench) -> dict:
    """A row's settings as they ran: bf16 autocast and fused AdamW take effect on CUDA only."""
    return {**spec, "bf16": spec["bf16"] and bench.cuda, "fused": spec["fused"] and bench.cuda}


UNET_VARIANTS = {
    # name: (data path, bf16 autocast, channels_last, fused AdamW via make_optimizer, compile, ema, per-step .item())
    "example style": dict(data="pixels", bf16=False, cl=False, fused=False, compile=False, ema=None, item=True),
    "cached latents, fp32, eager": dict(data="loader", bf16=False, cl=False, fused=False, compile=False, ema=None,
                                        item=False),
    "+ bf16 autocast": dict(data="loader", bf16=True, cl=False, fused=False, compile=False, ema=None, item=False),
    "+ channels_last": dict(data="loader", bf16=True, cl=True, fused=False, compile=False, ema=None, item=False),
    "+ fused AdamW (= ours, eager)": dict(data="loader", bf16=True, cl=True, fused=True, compile=False, ema=None,
                                          item=False),
    "+ torch.compile (= ours)": dict(data="loader", bf16=True, cl=True, fused=True, compile=True, ema=None, item=False),
    "ours + --latents_on_device": dict(data="resident", bf16=True, cl=True, fused=True, compile=True, ema=None,
                                             item=False),
    "ours + EMA (make_ema: foreach=True)": dict(data="loader", bf16=True, cl=True, fused=True, compile=True,
                                                ema="package", item=False),
    "ours + EMA (foreach=False, make_ema before 41ae458)": dict(data="loader", bf16=True, cl=True, fused=True,
                                                               compile=True, ema="loop", item=False),
    # candidates behind train_unet flags (CUDA only; docs/performance.md, recommendation A)
    "ours, no channels_last": dict(data="loader", bf16=True, cl=False, fused=True, compile=True, ema=None, item=False,
                                   cuda_only=True),
    "ours + cudnn.benchmark": dict(data="loader", bf16=True, cl=True, fused=True, compile=True, ema=None, item=False,
                                   cudnn=True, cuda_only=True),
    "ours, compile mode reduce-overhead": dict(data="loader", bf16=True, cl=True, fused=True, compile=True, ema=None,
                                               item=False, mode="reduce-overhead", cuda_only=True, needs_compile=True),
}
# the default compile mode was host-bound and too noisy to price these (H200, 2026-11-26); with CUDA graphs
# the step's spread was under 1%, so their cost is measured in that mode
_REDUCE_OVERHEAD = UNET_VARIANTS["ours, compile mode reduce-overhead"]
UNET_VARIANTS.update({
    "reduce-overhead + EMA (make_ema)": {**_REDUCE_OVERHEAD, "ema": "package"},
    "reduce-overhead + --latents_on_device": {**_REDUCE_OVERHEAD, "data": "resident"},
    # inductor turns its layout optimization off for this UNet (decide_layout_opt: convolutions with twice as many
    # input as output channels), and every aten.convolution_backward then asked for layout copies (H200, 2026-12-04:
    # 93 a step, 18% of the kernel time); forced, the CPU graph hands it channels_last everywhere (docs/performance.md)
    "reduce-overhead + inductor layout optimization": {**_REDUCE_OVERHEAD, "layout_opt": True},
    "reduce-overhead, no channels_last": {**_REDUCE_OVERHEAD, "cl": False},
})
UNET_VARIANTS["ours + inductor layout optimization"] = {**UNET_VARIANTS["+ torch.compile (= ours)"], "layout_opt": True,
                                                         "needs_compile": True}  # default mode: profiled copies
# the first present; on CPU without --compile: train_unet's defaults (no --channels_last)
UNET_PROFILED = ("+ torch.compile (= ours)", "+ fused AdamW (= ours, eager)", "cached latents, fp32, eager")


def train_unet_can_run(config: dict) -> bool:
    """Whether train_unet has flags for this row's settings. Nothing in adni_diffusers forces inductor's layout
    optimization, so those rows are experiments: never "ours"."""
    return not config.get("layout_opt")


def is_ours_candidate(row: dict) -> bool:
    """A row "ours" may be: train_unet's default data path (batches cut on the host), no EMA, its own flags."""
    config = row["config"]
    return "error" not in row and config["data"] == "loader" and not config["ema"] and train_unet_can_run(config)


def unet_variant_names(bench: Bench, compile_: bool, primary: bool, variants=None) -> list[str]:
    """All variants at the first batch size (the ablation); at the others the example style, "ours"
    (what train_unet runs with these flags: on CUDA with --compile the reduce-overhead row, its default on one
    GPU) and ours with --latents_on_device.
    Variants that only differ on CUDA (bf16, fused AdamW) are skipped on CPU; compiled ones need --compile;
    `variants` (--variants) keeps only those named."""
    resident = "ours + --latents_on_device"
    if compile_ and bench.cuda:  # train_unet --compile on one GPU compiles with CUDA graphs since 2026-12-04
        ours, resident = "ours, compile mode reduce-overhead", "reduce-overhead + --latents_on_device"
    elif compile_:
        ours = "+ torch.compile (= ours)"
    elif bench.cuda:
        ours = "+ fused AdamW (= ours, eager)"
    else:  # on CPU: no bf16, make_optimizer is plain AdamW, --channels_last off by default (and not faster here)
        ours = "cached latents, fp32, eager"
    names = list(UNET_VARIANTS) if primary else ["example style", ours, resident]
    if variants:
        names = [n for n in names if n in variants]
    return [n for n in names if unet_row_blocked(n, compile_, bench.cuda) is None]


def unet_row_blocked(name: str, compile_: bool, cuda: bool) -> str | None:
    """Why the UNet row `name` does not run with these flags (None: it runs). Rows that only differ on CUDA
    (bf16, fused AdamW) are skipped on CPU; the compiled one needs --compile."""
    spec = UNET_VARIANTS[name]
    if not cuda and (spec.get("cuda_only") or name in ("+ bf16 autocast", "+ fused AdamW (= ours, eager)")):
        return "runs on --device cuda only"
    if not compile_ and (name == "+ torch.compile (= ours)" or spec.get("needs_compile")):
        return "needs --compile"
    return None


def vq_row_blocked(name: str, compile_: bool, cuda: bool) -> str | None:
    """Why the VQ row `name` does not run with these flags (None: it runs)."""
    spec = VQ_VARIANTS[name]
    if not cuda and spec.get("cuda_only"):
        return "runs on --device cuda only"
    if not compile_ and spec["compile"]:
        return "needs --compile"
    return None


def row_blocked(name: str, compile_: bool, cuda: bool) -> str | None:
    """Why a row named in --variants / --profile-variants runs in no section (None: it runs in one): it was
    dropped without a word, and the section came out empty (device time spent on nothing)."""
    reasons = [blocked(name, compile_, cuda) for table, blocked in ((UNET_VARIANTS, unet_row_blocked),
                                                                     (VQ_VARIANTS, vq_row_blocked)) if name in table]
    return None if None in reasons else reasons[0]


def unet_row_name(variant: str, spec: dict, bench: Bench) -> str:
    """What actually ran, in words (the same variant reads differently on CPU and CUDA)."""
    if spec["data"] == "pixels":
        return f"example style: VQ encode of every batch, {'fp32 (TF32)' if bench.cuda else 'fp32'}, eager, AdamW, .item() per step"
    parts = ["cached latents via DataLoader" if spec["data"] == "loader" else "cached latents, --latents_on_device"]
    parts.append("bf16 autocast" if spec["bf16"] and bench.cuda else ("fp32 (TF32)" if bench.cuda else "fp32"))
    if spec["cl"]:
        parts.append("channels_last")
    if spec.get("cudnn"):
        parts.append("cudnn.benchmark")
    if spec["fused"] and bench.cuda:
        parts.append("fused AdamW")
    parts.append(compiled_words(spec))
    if spec["ema"]:
        parts.append("EMA foreach=True (make_ema)" if spec["ema"] == "package" else "EMA foreach=False (old make_ema)")
    return ", ".join(parts)


def bench_unet(bench: Bench, opts, flops: dict, rates: Rates) -> dict:
    from diffusers import UNet2DModel, VQModel

    from adni_diffusers.data import SliceDataset
    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler
    from adni_diffusers.latents import LatentDataset
    from adni_diffusers.presets import unet_config, vq_config
    from adni_diffusers.training import make_ema, make_optimizer, maybe_compile, to_channels_last

    ucfg, example_vcfg = unet_config(opts.preset), vq_config(opts.example_vq_preset)
    noise_scheduler = make_noise_scheduler()
    dev = bench.device
    accelerator = SimpleNamespace(device=dev, num_processes=1)

    rows = []
    n_latents = max(opts.batch_sizes) * (opts.repeats * opts.steps + opts.warmup + 2)  # no epoch restart while timed
    g = torch.Generator().manual_seed(0)
    latents_cpu = torch.randn(n_latents, 4, 32, 32, generator=g)  # scaled latents have unit variance
    labels_cpu = torch.randint(0, 2, (n_latents,), generator=g)
    pixel_slices = None

    primary_names = unet_variant_names(bench, opts.compile, True, opts.variants)
    unet_profiled = profiled_variants(opts, UNET_PROFILED, primary_names)
    for bi, bs in enumerate(opts.batch_sizes):
        fresh_compile_cache()  # one compilation per batch size (static shapes), shared by that size's rows
        for name in unet_variant_names(bench, opts.compile, bi == 0, opts.variants):
            spec = dict(UNET_VARIANTS[name])
            spec["compile"] = spec["compile"] and opts.compile  # without --compile every row runs eager
            row = {"name": unet_row_name(name, spec, bench), "variant": name, "batch_size": bs,
                   "config": effective_config(spec, bench), "train_unet_can_run": train_unet_can_run(spec)}
            if spec["data"] == "pixels" and pixel_slices is None:
                pixel_slices = random_slices(max(opts.batch_sizes) * 2)

            def run(row, spec=spec, bs=bs, profiled=(bi == 0 and name in unet_profiled)):
                bench.reset_peak()
                args = train_args(bs, channels_last=spec["cl"], compile=spec["compile"], compile_mode=spec.get("mode"))
                torch.manual_seed(0)
                unet = to_channels_last(UNet2DModel(**ucfg).to(dev), args)
                unet.train()
                if spec["fused"]:
                    optimizer = make_optimizer(unet.parameters(), args, accelerator, default_batch=64)
                    row["optimizer"] = f"make_optimizer (fused={bool(optimizer.defaults.get('fused'))})"
                elif spec["data"] == "pixels":
                    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
                    row["optimizer"] = "torch.optim.AdamW defaults"
                else:  # make_optimizer's settings without fused, so that "+ fused AdamW" varies that alone (these
                    # rows took torch's weight_decay 0.01 until 2026-12-04: one more optimizer operation than ours)
                    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate,
                                                  betas=(args.adam_beta1, args.adam_beta2),
                                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
                    row["optimizer"] = "make_optimizer's settings, not fused"
                row["optimizer_settings"] = {k: optimizer.defaults.get(k) for k in
                                             ("lr", "betas", "eps", "weight_decay", "fused", "foreach")}
                probe_z = latents_cpu[:bs].to(dev)

                def probe(m):  # as train_unet probes: one real forward + backward at the training batch size
                    with autocast(bench, spec["bf16"]):
                        loss = diffusion_loss(m, noise_scheduler, probe_z, None, torch.Generator(device=dev).manual_seed(0),
                                              "mse", spec["cl"])
                    loss.backward()

                model = {"m": maybe_compile(unet, args, probe=probe)}
                if getattr(args, "compile_seconds", None):  # the probe's step, compilation included
                    row["compile_seconds"] = dict(args.compile_seconds)
                if spec["compile"] and model["m"] is unet:
                    row["compile_error"] = "maybe_compile's probe failed: eager (see the warning)"
                    row["name"] += " [compile failed: eager]"
                ema = None
                if spec["ema"] == "package":
                    ema = make_ema(unet, train_args(bs, use_ema=True), dev).ema
                elif spec["ema"] == "loop":  # what make_ema built before it passed foreach=True
                    from diffusers.training_utils import EMAModel

                    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                                   power=0.75, foreach=False)
                    ema.to(dev)
                vq = None
                if spec["data"] == "pixels":
                    torch.manual_seed(0)
                    vq = VQModel(**example_vcfg).to(dev).eval().requires_grad_(False)
                    batches = cycle(make_loader(SliceDataset(pixel_slices), bs, bench, package=False))
                elif spec["data"] == "loader":
                    batches = cycle(make_loader(LatentDataset(latents_cpu, labels_cpu), bs, bench))
                else:  # train_unet --latents_on_device: the same loader, batches cut on the device
                    batches = cycle(make_loader(LatentDataset(latents_cpu, labels_cpu, device=dev), bs, bench))
                pending, counter = [], {"step": 0}

                def step():
                    batch = next(batches)
                    if vq is not None:  # the example style: encode the pixels of every batch
                        with torch.no_grad():
                            x = batch["pixel_values"].to(dev)
                            z0 = vq.encode(x).latents * vq.config.scaling_factor
                    else:  # Accelerate's prepared loader (make_accelerator: DataLoaderConfiguration(non_blocking=True))
                        z0 = batch["latents"].to(dev, non_blocking=True)
                    gen = torch.Generator(device=dev).manual_seed(counter["step"])  # as run.step_generator()
                    with autocast(bench, spec["bf16"]):
                        loss = diffusion_loss(model["m"], noise_scheduler, z0, None, gen, "mse", spec["cl"])
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.step(unet.parameters())
                    counter["step"] += 1
                    if spec["item"]:
                        row.setdefault("_losses", []).append(loss.detach().item())  # the example logs every step
                    else:  # TrainingRun.end_step keeps detached tensors; flush_logs syncs every logging_steps
                        pending.append(loss.detach().float())
                        if len(pending) == args.logging_steps:
                            torch.stack(pending).mean().item()
                            pending.clear()

                timing = timed_training_row(bench, row, step, opts, spec["compile"],
                                            use_eager=lambda: model.update(m=unet))
                # the example-style step also encodes its batch with its VQModel: that work is in its time
                step_flops = flops["unet_train_per_image"] + (
                    flops["example_vq_encode_per_image"] if spec["data"] == "pixels" else 0)
                finish_row(row, bs, timing, bench, step_flops, rates, spec["bf16"])
                row["syncs_per_step"] = per_step_syncs(bench, step, args.logging_steps)
                row.pop("_losses", None)
                if profiled and opts.profile:
                    row["profile"] = profile_steps(bench, step, opts.profile_steps)

            with row_settings(spec):
                rows.append(bench.guarded(row, run))
    return {"preset": opts.preset, "example_vq_preset": opts.example_vq_preset, "rows": rows,
            "summary": unet_summary(rows, opts.batch_sizes)}


def unet_summary(rows: list[dict], batch_sizes) -> dict:
    """Best "ours" (is_ours_candidate; the chosen row's variant and batch are recorded), best with
    --latents_on_device, best example style, and their ratios."""
    ok = [r for r in rows if "error" not in r]
    best_ours = max((r for r in ok if is_ours_candidate(r)), key=lambda r: r["images_per_s"], default=None)
    best_resident = max((r for r in ok if r["config"]["data"] == "resident" and not r["config"]["ema"]
                         and train_unet_can_run(r["config"])), key=lambda r: r["images_per_s"], default=None)
    best_example = max((r for r in ok if r["variant"] == "example style"), key=lambda r: r["images_per_s"],
                       default=None)
    summary = {}
    if best_ours:
        summary.update(best_ours=best_ours["name"], best_ours_variant=best_ours["variant"],
                       best_ours_batch=best_ours["batch_size"], best_ours_images_per_s=best_ours["images_per_s"],
                       best_ours_mfu=best_ours.get("mfu"), best_ours_mfu_invalid=best_ours.get("mfu_invalid"))
    if best_resident:
        summary.update(best_resident_images_per_s=best_resident["images_per_s"],
                       best_resident_variant=best_resident["variant"], best_resident_batch=best_resident["batch_size"],
                       best_resident_mfu=best_resident.get("mfu"))
    if best_example:
        summary["best_example_images_per_s"] = best_example["images_per_s"]
        if best_ours:
            summary["speedup"] = best_ours["images_per_s"] / best_example["images_per_s"]
        if best_resident:
            summary["speedup_resident"] = best_resident["images_per_s"] / best_example["images_per_s"]
    for bs in batch_sizes:  # the ratio at the same batch size too
        ex = next((r for r in ok if r["batch_size"] == bs and r["variant"] == "example style"), None)
        ours = [r for r in ok if r["batch_size"] == bs and is_ours_candidate(r)]
        if ex and ours:
            summary.setdefault("speedup_by_batch", {})[str(bs)] = max(r["images_per_s"] for r in ours) / ex["images_per_s"]
    return summary


# ------------------------------------------------------------------------------------- FLOP counts


def model_flops(bench: Bench, opts) -> dict:
    """FLOPs per image of every model pass the benchmark times (counted once, fp32, math attention)."""
    from diffusers import UNet2DModel, VQModel

    from adni_diffusers.presets import unet_config, vq_config
    from adni_diffusers.vq import VQTrainingModel

    dev = bench.device
    out = {}
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config(opts.preset)).to(dev)
    out["unet_params"] = sum(p.numel() for p in unet.parameters())
    t = torch.tensor([10, 500], device=dev)
    out["unet_train_per_image"] = count_flops(
        lambda: unet(torch.randn(2, 4, 32, 32, device=dev), t).sample.float().pow(2).mean().backward()) / 2
    with torch.no_grad():
        out["unet_forward_per_image"] = count_flops(lambda: unet(torch.randn(2, 4, 32, 32, device=dev), t)) / 2
    torch.manual_seed(0)
    vq = VQModel(**vq_config(opts.vq_preset)).to(dev)
    out["vq_params"] = sum(p.numel() for p in vq.parameters())
    x = torch.randn(1, 1, 256, 256, device=dev)
    with torch.no_grad():
        out["vq_encode_per_image"] = count_flops(lambda: vq.encode(x))
        out["vq_decode_per_image"] = count_flops(lambda: vq.decode(torch.randn(1, 4, 32, 32, device=dev)))
    if opts.example_vq_preset != opts.vq_preset:  # the example-style UNet row encodes with this one
        torch.manual_seed(0)
        example_vq = VQModel(**vq_config(opts.example_vq_preset)).to(dev)
        with torch.no_grad():
            out["example_vq_encode_per_image"] = count_flops(lambda: example_vq.encode(x))
        del example_vq
    else:
        out["example_vq_encode_per_image"] = out["vq_encode_per_image"]
    model = VQTrainingModel(vq)

    def vq_step():
        o = model(x)
        ((o.recon.float() - x) ** 2).mean().add(o.codebook_loss + 0.25 * o.commitment_loss).backward()

    out["vq_train_per_image"] = count_flops(vq_step)
    gc.collect()
    return out


# ------------------------------------------------------------------------------- 2. latent cache, VQ


def bench_latent_cache(bench: Bench, opts, flops: dict, rates: Rates) -> dict:
    from diffusers import VQModel

    from adni_diffusers.latents import encode_all
    from adni_diffusers.presets import vq_config

    vcfg = vq_config(opts.vq_preset)
    slices = random_slices(opts.encode_images, seed=1)
    dtypes = [torch.float32, torch.bfloat16] if bench.cuda else [torch.float32]
    rows = []
    for dtype in dtypes:
        for bs in opts.encode_batch_sizes:
            as_trained = dtype == torch.float32 and bs == 16
            name = f"encode_all, {'fp32 (TF32)' if bench.cuda and dtype == torch.float32 else str(dtype)[6:]} weights"
            if as_trained:
                name += " (as train_unet builds the cache)"
            row = {"name": name, "batch_size": bs, "images": len(slices), "dtype": str(dtype)[6:]}

            def run(row, dtype=dtype, bs=bs):
                bench.reset_peak()
                torch.manual_seed(0)
                vq = VQModel(**vcfg).to(bench.device, dtype).eval().requires_grad_(False)
                encode_all(vq, slices.subset(list(range(min(bs, len(slices))))), bs, progress=False)  # warm-up
                bench.sync()
                t0 = time.perf_counter()
                latents = encode_all(vq, slices, bs, progress=False)
                bench.sync()
                seconds = time.perf_counter() - t0
                row.update(seconds=seconds, images_per_s=len(slices) / seconds, peak_memory_mb=round(bench.peak_mb(), 1),
                           latent_shape=list(latents.shape))
                rates.mfu(row, flops["vq_encode_per_image"], dtype == torch.bfloat16)
                row["seconds_for_30520_images"] = 30520 / row["images_per_s"]  # arithmetic, labelled as such
                del vq

            rows.append(bench.guarded(row, run))
    return {"vq_preset": opts.vq_preset, "rows": rows}


VQ_VARIANTS = {
    "example style": dict(bf16=False, cl=False, fused=False, compile=False, item=True, ssim=False),
    "ours": dict(bf16=True, cl=True, fused=True, compile=False, item=False, ssim=True),
    "ours, --ssim_weight 0": dict(bf16=True, cl=True, fused=True, compile=False, item=False, ssim=False),
    "ours + compile": dict(bf16=True, cl=True, fused=True, compile=True, item=False, ssim=True),
    "ours, no channels_last (train_vqmodel's default)": dict(bf16=True, cl=False, fused=True, compile=False,
                                                            item=False, ssim=True),
    # candidates behind train_vqmodel flags (CUDA only)
    "ours + compile, no channels_last": dict(bf16=True, cl=False, fused=True, compile=True, item=False, ssim=True,
                                             cuda_only=True),
    "ours + compile + cudnn.benchmark": dict(bf16=True, cl=True, fused=True, compile=True, item=False, ssim=True,
                                             cudnn=True, cuda_only=True),
    "ours + compile, mode reduce-overhead": dict(bf16=True, cl=True, fused=True, compile=True, item=False, ssim=True,
                                                 mode="reduce-overhead", cuda_only=True),
}
VQ_PROFILED = ("ours + compile", "ours")  # the first present


VQ_SSIM_WEIGHT = 0.5  # train_vqmodel's --ssim_weight default (the example style has no SSIM term)


def vq_row_name(variant: str, spec: dict, bench: Bench) -> str:
    if variant == "example style":
        return f"example style: {'fp32 (TF32)' if bench.cuda else 'fp32'}, eager, AdamW, .item() per step"
    parts = ["as train_vqmodel runs", "bf16 autocast" if bench.cuda else "fp32"]
    if spec["cl"]:
        parts.append("channels_last")
    if spec.get("cudnn"):
        parts.append("cudnn.benchmark")
    parts.append(f"MSE + {VQ_SSIM_WEIGHT} x (1 - SSIM)" if spec["ssim"] else "MSE only (--ssim_weight 0)")
    if bench.cuda:
        parts.append("fused AdamW")
    parts.append(compiled_words(spec))
    return ", ".join(parts)


def bench_vq(bench: Bench, opts, flops: dict, rates: Rates) -> dict:
    from diffusers import VQModel

    from adni_diffusers.data import SliceDataset
    from adni_diffusers.presets import vq_config
    from adni_diffusers.training import make_optimizer, maybe_compile, to_channels_last
    from adni_diffusers.vq import CodebookMonitor, VQTrainingModel, code_counts, vq_training_loss

    vcfg = vq_config(opts.vq_preset)
    dev = bench.device
    accelerator = SimpleNamespace(device=dev, num_processes=1)
    slices = random_slices(max(opts.vq_batch_sizes) * 4, seed=2)
    rows = []
    variants = {n: s for n, s in VQ_VARIANTS.items()
                if vq_row_blocked(n, opts.compile, bench.cuda) is None and (not opts.variants or n in opts.variants)}
    vq_profiled = profiled_variants(opts, VQ_PROFILED, variants)
    for bi, bs in enumerate(opts.vq_batch_sizes):
        fresh_compile_cache()
        for name, spec in variants.items():
            row = {"name": vq_row_name(name, spec, bench), "variant": name, "batch_size": bs,
                   "config": effective_config(spec, bench)}

            def run(row, spec=spec, bs=bs, profiled=(bi == 0 and name in vq_profiled)):
                bench.reset_peak()
                args = train_args(bs, learning_rate=2e-4, channels_last=spec["cl"], compile=spec["compile"],
                                  compile_mode=spec.get("mode"))
                torch.manual_seed(0)
                vq = to_channels_last(VQModel(**vcfg).to(dev), args)
                model = VQTrainingModel(vq).train()
                monitor = CodebookMonitor(vcfg["num_vq_embeddings"]).to(dev)
                if spec["fused"]:
                    optimizer = make_optimizer(model.parameters(), args, accelerator, default_batch=8)
                else:
                    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
                def training_loss(m, x):  # train_vqmodel's step loss (no GAN term), with the forward's output
                    def forward(x):
                        with autocast(bench, spec["bf16"]):  # Accelerate autocasts the model's forward only
                            return m(x)

                    # train_vqmodel's defaults; the example style has no SSIM term
                    return vq_training_loss(forward, x, ssim_weight=VQ_SSIM_WEIGHT if spec["ssim"] else 0.0)[:2]

                # as train_vqmodel probes: the step's own loss (the reconstruction loss alone gives the codebook no
                # gradient, so the probe would not compile the backward the step runs)
                probe_x = SliceDataset(slices)[0]["pixel_values"][None].repeat(bs, 1, 1, 1).to(dev)
                compiled = {"m": maybe_compile(model, args, probe=lambda m: training_loss(m, probe_x)[0].backward())}
                if getattr(args, "compile_seconds", None):  # the probe's step, compilation included
                    row["compile_seconds"] = dict(args.compile_seconds)
                if spec["compile"] and compiled["m"] is model:
                    row["compile_error"] = "maybe_compile's probe failed: eager (see the warning)"
                    row["name"] += " [compile failed: eager]"
                ours = name != "example style"
                batches = cycle(make_loader(SliceDataset(slices), bs, bench, package=ours))
                pending = []

                def step():
                    x = next(batches)["pixel_values"].to(dev, non_blocking=ours)
                    loss, out = training_loss(compiled["m"], x)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ours:  # train_vqmodel: index_add_, no host sync
                        counts = code_counts(out.indices, monitor.usage.numel())
                    else:
                        counts = torch.bincount(out.indices, minlength=monitor.usage.numel())
                    monitor.update(counts)
                    logs = [loss.detach(), monitor.perplexity(counts), monitor.live_fraction()]
                    if spec["item"]:
                        [v.item() for v in logs]
                    else:
                        pending.append(torch.stack([v.float() for v in logs]))
                        if len(pending) == args.logging_steps:
                            torch.stack(pending).mean(0).tolist()
                            pending.clear()

                timing = timed_training_row(bench, row, step, opts, spec["compile"],
                                            use_eager=lambda: compiled.update(m=model))
                finish_row(row, bs, timing, bench, flops["vq_train_per_image"], rates, spec["bf16"])
                row["syncs_per_step"] = per_step_syncs(bench, step, args.logging_steps)
                if profiled and opts.profile:
                    row["profile"] = profile_steps(bench, step, opts.profile_steps)

            with row_settings(spec):
                rows.append(bench.guarded(row, run))
    return {"vq_preset": opts.vq_preset, "rows": rows, "summary": vq_summary(rows)}


def vq_summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    # "best" = the best of train_vqmodel's default loss (with SSIM), eager or compiled with --compile
    best = max((r for r in ok if r["config"]["ssim"]), key=lambda r: r["images_per_s"], default=None)
    best_compiled = max((r for r in ok if r["variant"] == "ours + compile"), key=lambda r: r["images_per_s"],
                        default=None)
    ex = max((r for r in ok if r["variant"] == "example style"), key=lambda r: r["images_per_s"], default=None)
    summary = {}
    if best:
        summary.update(best=best["name"], best_variant=best["variant"], best_batch=best["batch_size"],
                       best_images_per_s=best["images_per_s"], best_mfu=best.get("mfu"))
    if best_compiled:
        summary.update(best_compiled_images_per_s=best_compiled["images_per_s"],
                       best_compiled_batch=best_compiled["batch_size"], best_compiled_mfu=best_compiled.get("mfu"))
    if best and ex:
        summary["speedup"] = best["images_per_s"] / ex["images_per_s"]
    no_ssim = max((r for r in ok if r["variant"] == "ours, --ssim_weight 0"), key=lambda r: r["images_per_s"],
                  default=None)
    if no_ssim and ex:  # the same loss as the example style
        summary["speedup_no_ssim"] = no_ssim["images_per_s"] / ex["images_per_s"]
    return summary


# ------------------------------------------------------------------------------------- 3. sampling


def build_pipeline(unet_preset: str, vq_preset: str, device, dtype=None, class_names=None):
    """Random weights. class_names: a class-conditional UNet (one embedding per class + the "no label" one, as
    train_unet --conditional builds it)."""
    from diffusers import UNet2DModel, VQModel

    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config, vq_config

    torch.manual_seed(0)
    ucfg = unet_config(unet_preset)
    if class_names:
        ucfg["num_class_embeds"] = len(class_names) + 1
    pipe = ADNILatentDiffusionPipeline(VQModel(**vq_config(vq_preset)).eval(), UNet2DModel(**ucfg).eval(),
                                       make_noise_scheduler(), class_names=class_names)
    pipe.to(device=device, dtype=dtype) if dtype is not None else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler_steps(name: str, opts) -> int:
    from adni_diffusers.schedulers import default_steps

    if opts.smoke:
        return opts.ddpm_steps if name == "ddpm" else SMOKE_SOLVER_STEPS
    return opts.ddpm_steps if name == "ddpm" else default_steps(name)


PIPELINE_PATH, GENERATE_PATH = "pipeline call", "generate"
SAMPLING_PATHS = ("pipeline", "generate")


def timed_calls(bench: Bench, call, steps: int, sampler: str, opts) -> tuple[float, list[float]]:
    """`repeats` timed calls (one for DDPM with >= 500 steps): the median and every call's seconds."""
    repeats = 1 if sampler == "ddpm" and steps >= 500 else opts.sample_repeats
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(steps)
        bench.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def sampling_timing(row: dict, bs: int, seconds: float, times: list[float]) -> None:
    row.update(seconds_per_call=seconds, seconds_per_call_all=[round(x, 4) for x in times], images_per_s=bs / seconds,
               spread=(max(times) - min(times)) / seconds)


def bench_sampling(bench: Bench, opts, flops: dict, rates: Rates) -> dict:
    rows = []
    if "pipeline" in opts.sampling_paths:
        rows += pipeline_rows(bench, opts, flops, rates)
    if "generate" in opts.sampling_paths:
        rows += generate_rows(bench, opts, flops, rates)
    return {"preset": opts.preset, "vq_preset": opts.vq_preset, "rows": rows, "best": sampling_summary(rows)}


def sampling_summary(rows: list[dict]) -> dict:
    """The fastest row per path and sampler label."""
    best = {}
    for r in rows:
        if "error" in r:
            continue
        key = f"{r['path']}: {r['label']}"
        if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
            best[key] = r
    return {k: {"images_per_s": v["images_per_s"], "batch_size": v["batch_size"], "variant": v["name"]}
            for k, v in best.items()}


def pipeline_rows(bench: Bench, opts, flops: dict, rates: Rates) -> list[dict]:
    """The pipeline called directly: unconditional, one device generator, output_type="pt" (images stay on the
    device), no PNG. Not what `adni-diffusers generate` runs (generate_rows)."""
    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.schedulers import make_scheduler

    dev = bench.device
    base_config = make_noise_scheduler().config
    variants = []  # (name, dtype, compile, batch sizes)
    if bench.cuda:
        variants.append(("fp32 (TF32) weights, eager", None, False, opts.sample_batch_sizes[:1]))
        variants.append(("bf16 weights, eager", torch.bfloat16, False, opts.sample_batch_sizes))
        if opts.compile:
            variants.append((f"bf16 weights, compiled UNet + VQ decoder (mode={opts.compile_mode})", torch.bfloat16,
                             True, opts.sample_batch_sizes))
    else:
        variants.append(("fp32 weights, eager", None, False, opts.sample_batch_sizes))
        if opts.compile:
            variants.append((f"fp32 weights, compiled UNet + VQ decoder (mode={opts.compile_mode})", None, True,
                             opts.sample_batch_sizes))
    rows = []
    from adni_diffusers.compile_probe import CUDA_GRAPH_MODES

    graphs = opts.compile_mode in CUDA_GRAPH_MODES
    for vname, dtype, compile_, batch_sizes in variants:
        for bs in batch_sizes:
            if not graphs:
                fresh_compile_cache()
            for sampler in opts.samplers:
                if graphs:  # each row compiles for itself (in its warm-up): a compilation shared with the batch
                    # size's earlier rows (until 2026-12-04) kept their CUDA graphs' memory pools allocated, inside
                    # this row's peak memory. Without CUDA graphs the rows share one compile (minutes less)
                    fresh_compile_cache()
                steps = sampler_steps(sampler, opts)
                row = {"path": PIPELINE_PATH, "sampler": sampler, "steps": steps, "label": f"{sampler}-{steps}",
                       "name": f"pipeline call (one device generator, unconditional, no PNG), {vname}",
                       "batch_size": bs}

                def run(row, dtype=dtype, compile_=compile_, bs=bs, sampler=sampler, steps=steps):
                    bench.reset_peak()
                    pipe = build_pipeline(opts.preset, opts.vq_preset, dev, dtype)
                    pipe.scheduler = make_scheduler(sampler, base_config)
                    if compile_:
                        pipe.unet.compile(mode=opts.compile_mode)
                        pipe.vqvae.decoder.compile(mode=opts.compile_mode)
                    last = {}

                    def call(n):
                        gen = torch.Generator(device=dev).manual_seed(0)
                        last["images"] = pipe(batch_size=bs, num_inference_steps=n, generator=gen,
                                              output_type="pt").images
                        return last["images"]

                    t0 = time.perf_counter()
                    # Warm-up (and compilation) at this batch size; twice when compiled: CUDA graphs record on
                    # a module's 2nd call, and the decoder's 2nd call would otherwise fall inside the timing.
                    row["warmup_calls"] = 2 if compile_ else 1
                    try:
                        for _ in range(row["warmup_calls"]):
                            call(min(steps, 3))
                    except Exception as e:  # noqa: BLE001
                        compile_failed(bench, row, e, compile_)
                        pipe = build_pipeline(opts.preset, opts.vq_preset, dev, dtype)
                        pipe.scheduler = make_scheduler(sampler, base_config)
                        call(min(steps, 3))
                    bench.sync()
                    row["warmup_seconds"] = round(time.perf_counter() - t0, 3)
                    seconds, times = timed_calls(bench, call, steps, sampler, opts)
                    images = last["images"]
                    sampling_timing(row, bs, seconds, times)
                    row.update(peak_memory_mb=round(bench.peak_mb(), 1), finite=bool(torch.isfinite(images).all()),
                               image_shape=list(images.shape[1:]))
                    rates.mfu(row, steps * flops["unet_forward_per_image"] + flops["vq_decode_per_image"],
                              dtype == torch.bfloat16)
                    if bench.cuda:  # host-device syncs: per denoising step, and fixed per call
                        s2 = bench.count_syncs(lambda: call(2))
                        s4 = bench.count_syncs(lambda: call(4))
                        row["syncs_per_step"] = (s4 - s2) / 2
                        row["syncs_per_call_fixed"] = s2 - 2 * row["syncs_per_step"]

                rows.append(bench.guarded(row, run))
    return rows


def generate_rows(bench: Bench, opts, flops: dict, rates: Rates) -> list[dict]:
    """`adni_diffusers.generate.generate`, the function behind `adni-diffusers generate`, on a pipeline built here
    (random weights, so no load time): one CPU generator per image, uint8 PNGs, grid.png and generation.json
    written to a temporary folder, one batch per call. Unconditional, and a class-conditional UNet sampled with
    --class (generate's default guidance 2: the UNet runs on twice the batch)."""
    import tempfile

    from adni_diffusers.generate import generate

    dev = bench.device
    dtype = torch.bfloat16 if bench.cuda else None  # the CUDA rows as `generate --dtype bfloat16`
    words = "bf16 weights (--dtype bfloat16)" if bench.cuda else "fp32 weights"
    variants = [(f"{words}, eager", False)]
    if opts.compile:  # generate --compile: reduce-overhead on CUDA, torch's default mode on the CPU
        variants.append((f"{words}, --compile (UNet + VQ decoder, mode {'reduce-overhead' if bench.cuda else 'default'})",
                         True))
    rows = []
    for vname, compile_ in variants:
        for bs in opts.generate_batch_sizes:
            for sampler in opts.samplers:
                for conditional in (False, True):
                    fresh_compile_cache()  # each row compiles for itself, as one `generate --compile` process
                    steps = sampler_steps(sampler, opts)
                    cond_words = f"class-conditional UNet, --class {GENERATE_CLASS} (guidance 2)" if conditional \
                        else "unconditional UNet"
                    row = {"path": GENERATE_PATH, "sampler": sampler, "steps": steps, "label": f"{sampler}-{steps}",
                           "name": f"generate (a CPU generator per image, PNG per image), {cond_words}, {vname}",
                           "batch_size": bs, "conditional": conditional}

                    def run(row, compile_=compile_, bs=bs, sampler=sampler, steps=steps, conditional=conditional):
                        bench.reset_peak()
                        pipe = build_pipeline(opts.preset, opts.vq_preset, dev, dtype,
                                              class_names=["AD", "NC"] if conditional else None)
                        with tempfile.TemporaryDirectory() as tmp:
                            folders = (Path(tmp) / f"call-{i}" for i in range(10**6))  # a fresh --out per call
                            last = {}

                            def call(n, compile_now=False):
                                last["out"] = next(folders)
                                generate(str(Path(tmp) / "random-weights"), last["out"], num_images=bs,
                                         class_label=GENERATE_CLASS if conditional else None, scheduler=sampler,
                                         steps=n, seed=0, batch_size=bs, device=str(dev),
                                         dtype="bfloat16" if dtype == torch.bfloat16 else "float32", pipe=pipe,
                                         compile=compile_now)

                            t0 = time.perf_counter()
                            # compiled: generate compiles in place on the first call; CUDA graphs record on the 2nd
                            row["warmup_calls"] = 2 if compile_ else 1
                            try:
                                for i in range(row["warmup_calls"]):
                                    call(min(steps, 3), compile_now=compile_ and i == 0)
                            except Exception as e:  # noqa: BLE001
                                compile_failed(bench, row, e, compile_)
                                pipe = build_pipeline(opts.preset, opts.vq_preset, dev, dtype,
                                                      class_names=["AD", "NC"] if conditional else None)
                                call(min(steps, 3))
                            bench.sync()
                            row["warmup_seconds"] = round(time.perf_counter() - t0, 3)
                            seconds, times = timed_calls(bench, call, steps, sampler, opts)
                            sampling_timing(row, bs, seconds, times)
                            settings = json.loads((last["out"] / "generation.json").read_text())
                            row.update(peak_memory_mb=round(bench.peak_mb(), 1), guidance=settings["guidance"],
                                       pngs_per_call=len(list(last["out"].glob("sample-*.png"))))
                        # with guidance the UNet runs on the conditional and the "no label" batch together
                        row["unet_passes_per_image_step"] = 2 if conditional and row["guidance"] != 1 else 1
                        rates.mfu(row, steps * row["unet_passes_per_image_step"] * flops["unet_forward_per_image"]
                                  + flops["vq_decode_per_image"], dtype == torch.bfloat16)

                    rows.append(bench.guarded(row, run))
    return rows


def bench_cpu_goal(bench: Bench, opts) -> dict:
    """The issue's CPU goal: 4 images with a 25-step sampler (DPM-Solver++) from a saved folder (load + sample,
    as a user runs it), wall time, one row per --cpu-goal-presets (UNet and VQModel of that preset). The goal is
    judged on `base`, the models the product trains."""
    return {"rows": [cpu_goal_row(bench, opts, preset) for preset in opts.cpu_goal_presets]}


def cpu_goal_row(bench: Bench, opts, preset: str) -> dict:
    import tempfile

    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.schedulers import make_scheduler

    steps = SMOKE_SOLVER_STEPS if opts.smoke else 25
    row = {"name": f"4 images, dpm++-{steps}, {preset} preset (UNet + VQModel), output_type=pil", "preset": preset,
           "steps": steps, "batch_size": 4, "goal_configuration": preset == CPU_GOAL_PRESET and not opts.smoke}

    def run(row):
        bench.reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            pipe = build_pipeline(preset, preset, "cpu")
            pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
            row["parameters"] = sum(p.numel() for m in (pipe.unet, pipe.vqvae) for p in m.parameters())
            pipe.save_pretrained(tmp)
            del pipe
            t0 = time.perf_counter()
            pipe = ADNILatentDiffusionPipeline.from_pretrained(tmp)
            pipe.set_progress_bar_config(disable=True)
            row["load_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            images = pipe(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
            row["first_call_seconds"] = time.perf_counter() - t1
            row["load_and_sample_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            pipe(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
            row["second_call_seconds"] = time.perf_counter() - t1
            row["images"] = len(images)
            row["peak_memory_mb"] = round(bench.peak_mb(), 1)

    return bench.guarded(row, run)


# ------------------------------------------------------------------------------------------- goals


def sampling_goal_rate(rows: list[dict], goal: str, path: str, conditional: bool | None = None) -> float | None:
    """The fastest row of `path` (and conditioning) that the sampling goal `goal` is about."""
    def wanted(r):
        if goal == "ddpm1000_images_per_s":
            return r["sampler"] == "ddpm" and r["steps"] == 1000
        return r["sampler"] != "ddpm" and r["steps"] <= 25

    rates = [r["images_per_s"] for r in rows if "error" not in r and r["path"] == path and wanted(r)
             and (conditional is None or r.get("conditional") == conditional)]
    return max(rates) if rates else None


def goal_status(value, target, higher: bool) -> str:
    return "met" if (value >= target if higher else value <= target) else "not met"


def evaluate_goals(results: dict, opts, bench: Bench) -> list[dict]:
    unet = results.get("unet", {}).get("summary", {})
    vq = results.get("vq", {}).get("summary", {})
    sampling = results.get("sampling", {}).get("rows", [])
    measured, measured_on, invalid = {}, {}, {}
    if bench.cuda and opts.preset == "base" and not opts.smoke:
        measured["unet_images_per_s"] = unet.get("best_ours_images_per_s")
        measured["unet_speedup"] = unet.get("speedup")
        measured["unet_mfu"] = unet.get("best_ours_mfu")
        invalid["unet_mfu"] = unet.get("best_ours_mfu_invalid")
        if unet.get("best_ours_variant"):
            for key in ("unet_images_per_s", "unet_speedup", "unet_mfu"):
                measured_on[key] = f"row \"{unet['best_ours_variant']}\", batch {unet['best_ours_batch']}"
        if opts.vq_preset == "base":
            measured["vq_images_per_s"] = vq.get("best_images_per_s")
            if vq.get("best_variant"):
                measured_on["vq_images_per_s"] = f"row \"{vq['best_variant']}\", batch {vq['best_batch']}"
        for key in ("ddpm1000_images_per_s", "fast_sampler_images_per_s"):
            measured[key] = sampling_goal_rate(sampling, key, PIPELINE_PATH)
            measured_on[key] = "pipeline call (device generator, unconditional, no PNG)"
    cpu_goal = next((r for r in results.get("cpu_goal", {}).get("rows", []) if r.get("goal_configuration")), None)
    if not bench.cuda and cpu_goal and "error" not in cpu_goal:
        measured["cpu_4_images_25_steps_s"] = cpu_goal["load_and_sample_seconds"]
        measured_on["cpu_4_images_25_steps_s"] = f"{cpu_goal['preset']} preset"
    out = []
    for key, what, target, unit, higher, device in GOALS:
        value = measured.get(key)
        if value is None:
            if invalid.get(key):
                status = f"not measured: {invalid[key]}"
            elif key == "adni_training_minutes":
                status = "not measured (needs full training runs on ADNI-size data, not this benchmark)"
            elif device == "cuda" and not bench.cuda:
                status = "not measured (no GPU in this run)"
            elif device == "cpu" and bench.cuda:
                status = "not measured (run with --device cpu)"
            elif opts.smoke:
                status = "not measured (--smoke sizes)"
            elif key == "cpu_4_images_25_steps_s" and CPU_GOAL_PRESET not in opts.cpu_goal_presets:
                status = f"not measured (the goal is on the {CPU_GOAL_PRESET} preset: add it to --cpu-goal-presets)"
            else:
                status = "not measured (section skipped, failed, or not the goal configuration)"
        else:
            status = goal_status(value, target, higher)
        goal = {"goal": key, "what": what, "target": target, "unit": unit, "direction": ">=" if higher else "<=",
                "measured": value, "measured_on": measured_on.get(key), "status": status}
        if key in ("ddpm1000_images_per_s", "fast_sampler_images_per_s") and value is not None:
            # what `adni-diffusers generate` runs: the goal on that path, with and without --class
            goal["generate_path"] = {}
            for name, conditional in (("unconditional", False), (f"--class {GENERATE_CLASS}, guidance 2", True)):
                rate = sampling_goal_rate(sampling, key, GENERATE_PATH, conditional)
                goal["generate_path"][name] = {"measured": rate, "status": "not measured" if rate is None
                                               else goal_status(rate, target, higher)}
            goal["status"] = f"{status} on the pipeline call; generate: " + ", ".join(
                f"{name} {g['status']}" for name, g in goal["generate_path"].items())
        out.append(goal)
    return out


# ------------------------------------------------------------------------------------------ output


def _f(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mfu(row: dict) -> str:
    return "invalid (> 100%: peak under-measured)" if row.get("mfu_invalid") else _pct(row.get("mfu"))


def _spread(row: dict, key: str) -> str:
    return _pct(row["spread"]) if len(row.get(key, [])) > 1 else "-"


def _load(row: dict) -> str:
    load = row.get("load_average_1min") or []
    return " -> ".join(_f(x, 2) for x in load) if load and None not in load else "-"


def profile_markdown(row: dict) -> list[str]:
    p = row["profile"]
    head = (f"Profile of \"{row['name']}\" (batch {row['batch_size']}, {p['steps']} steps under torch.profiler, "
            f"{p['timed_by']}): wall {p['wall_ms_per_step']:.1f} ms/step, busy {p['busy_ms_per_step']:.1f} ms/step")
    if p.get("busy_fraction") is not None:
        head += (f" (the GPU busy {_pct(p['busy_fraction'])} of the wall time), "
                 f"{_f(p['kernel_launches_per_step'])} kernel launches and "
                 f"{_f(p['cuda_graph_launches_per_step'])} CUDA graph launches per step")
    lines = ["", head + ":", "", "| operator / kernel | ms/step | calls/step | share of busy time |", "|---|---|---|---|"]
    for t in p["top"]:
        name = t["name"].replace("|", "/")
        lines.append(f"| `{name[:100]}` | {t['ms_per_step']:.2f} | {_f(t['calls_per_step'])} | {_pct(t['share'])} |")
    if p.get("copies"):
        lines += ["", "`aten::copy_` by the operator that asked for it:", "",
                  "| called from | ms/step | calls/step | most common (source -> destination) |", "|---|---|---|---|"]
        for c in p["copies"]:
            lines.append(f"| `{c['called_from'].replace('|', '/')}` | {c['ms_per_step']:.2f} | "
                         f"{_f(c['calls_per_step'])} | `{c['most_common']}` |")
    return lines


def markdown(results: dict) -> str:
    m, lines = results["machine"], []
    lines.append(f"## adni_diffusers benchmark: {m['device_name']} ({m['device']})")
    lines.append("")
    lines.append(f"- date {m['date']}; torch {m['torch']}, diffusers {m['diffusers']}, accelerate {m['accelerate']}, "
                 f"python {m['python']}; {m['torch_threads']} torch threads; load average at start "
                 f"{m.get('load_average_start')}, at end {m.get('load_average_end')}")
    lines.append(f"- command: `{m['command']}`")
    mm, fl = results.get("matmul", {}), results.get("flops", {})
    if mm:
        extra = f", TF32 {mm['tf32_tflops']:.1f} TFLOP/s" if "tf32_tflops" in mm else ""
        when = ""
        if "start" in mm:
            when = (f"; the higher of the start ({mm['start']['tflops'] * 1000:,.1f}) and the end "
                    f"({mm['end']['tflops'] * 1000:,.1f}) measurements")
        sizes = ", ".join(f"{n}^3 {r:,.1f}" for n, r in mm.get("sizes_tried", {}).items())
        lines.append(f"- measured matmul rate ({mm['dtype']}, {mm['size']}^3): {mm['tflops'] * 1000:,.1f} GFLOP/s{extra}"
                     f"{when}{'; GFLOP/s per size: ' + sizes if len(mm.get('sizes_tried', {})) > 1 else ''} "
                     "(each row's MFU is of the rate of its own precision: bf16, or TF32 for fp32 rows; an MFU "
                     "above 100% is shown as invalid: the peak was under-measured)")
    if fl:
        lines.append(f"- FLOPs per image (torch.utils.flop_counter): UNet forward {fl['unet_forward_per_image'] / 1e9:.2f} G, "
                     f"UNet train step {fl['unet_train_per_image'] / 1e9:.2f} G ({fl['unet_params'] / 1e6:.1f}M params); "
                     f"VQ encode {fl['vq_encode_per_image'] / 1e9:.2f} G, decode {fl['vq_decode_per_image'] / 1e9:.2f} G, "
                     f"train step {fl['vq_train_per_image'] / 1e9:.2f} G ({fl['vq_params'] / 1e6:.1f}M params)"
                     + (f"; the example style's VQ encode {fl['example_vq_encode_per_image'] / 1e9:.2f} G"
                        if "example_vq_encode_per_image" in fl else ""))
    lines.append(f"- peak memory: {results.get('memory_kind')}")
    for key, title in (("unet", "UNet training step"), ("vq", "VQ training step")):
        sec = results.get(key)
        if not sec:
            continue
        pre = f"`{sec['preset']}` preset" if key == "unet" else f"`{sec['vq_preset']}` preset"
        if key == "unet" and sec.get("example_vq_preset"):
            pre += f"; the example style encodes with the `{sec['example_vq_preset']}` VQModel"
        lines += ["", f"### {title} ({pre})", "",
                  "| variant | batch | images/s | ms/step | spread | MFU | peak MB | syncs/step | compile s | "
                  "warm-up s | load | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sec["rows"]:
            note = r.get("error") or r.get("compile_error") or ""
            if key == "unet" and r.get("train_unet_can_run") is False:
                note = ("experiment: no train_unet flag for this; " + note).rstrip("; ")
            compile_s = (r.get("compile_seconds") or {}).get("first_step_here")
            lines.append(f"| {r['name']} | {r['batch_size']} | {_f(r.get('images_per_s'))} | "
                         f"{_f(r['seconds_per_step'] * 1000 if 'seconds_per_step' in r else None)} | "
                         f"{_spread(r, 'seconds_per_step_all')} | {_mfu(r)} | "
                         f"{_f(r.get('peak_memory_mb'))} | {_f(r.get('syncs_per_step'))} | {_f(compile_s)} | "
                         f"{_f(r.get('warmup_seconds'))} | {_load(r)} | {note} |")
        s = sec.get("summary", {})
        chosen = s.get("best_ours_variant") or s.get("best_variant")
        if chosen:
            batch = s.get("best_ours_batch") or s.get("best_batch")
            which = ("Ours: the fastest row train_unet can run (its own flags, no EMA, cached latents via the "
                     "DataLoader)" if key == "unet" else "Best: the fastest row with train_vqmodel's default loss")
            lines += ["", f"{which}: \"{chosen}\", batch {batch}"]
        if s.get("speedup"):
            lines.append("")
            lines.append(f"Best ours / best example style: **{s['speedup']:.2f}x**"
                         + (f" (same batch: {', '.join(f'{k}: {v:.2f}x' for k, v in s['speedup_by_batch'].items())})"
                            if s.get("speedup_by_batch") else "")
                         + (f"; with --latents_on_device: {s['speedup_resident']:.2f}x"
                            if s.get("speedup_resident") else "")
                         + (f"; without the SSIM term (the example style's loss): {s['speedup_no_ssim']:.2f}x"
                            if s.get("speedup_no_ssim") else ""))
        for r in sec["rows"]:
            if r.get("profile"):
                lines += profile_markdown(r)
    sec = results.get("latent_cache")
    if sec:
        lines += ["", f"### Latent-cache build (`encode_all`, `{sec['vq_preset']}` VQ preset)", "",
                  "| variant | batch | images | images/s | MFU | peak MB | note |", "|---|---|---|---|---|---|---|"]
        for r in sec["rows"]:
            lines.append(f"| {r['name']} | {r['batch_size']} | {r['images']} | {_f(r.get('images_per_s'))} | "
                         f"{_mfu(r)} | {_f(r.get('peak_memory_mb'))} | {r.get('error', '')} |")
    sec = results.get("sampling")
    if sec:
        lines += ["", f"### Sampling end to end (UNet steps + VQ decode; `{sec['preset']}` preset, random weights)", "",
                  "\"pipeline call\": the pipeline with one device generator, unconditional, images left on the "
                  "device, no PNG. \"generate\": `adni_diffusers.generate.generate`, what `adni-diffusers generate` "
                  "runs (a CPU generator per image, a PNG per image; with --class the UNet runs on twice the batch).",
                  "", "| sampler (steps run) | variant | batch | images/s | s/call | spread | MFU | peak MB | syncs/step "
                  "| load | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sec["rows"]:
            lines.append(f"| {r['label']} | {r['name']} | {r['batch_size']} | {_f(r.get('images_per_s'), 2)} | "
                         f"{_f(r.get('seconds_per_call'), 2)} | {_spread(r, 'seconds_per_call_all')} | {_mfu(r)} | "
                         f"{_f(r.get('peak_memory_mb'))} | {_f(r.get('syncs_per_step'))} | {_load(r)} | "
                         f"{r.get('error') or r.get('compile_error') or ''} |")
    sec = results.get("cpu_goal")
    if sec:
        lines += ["", "### CPU goal rows", "", "| what | parameters | load s | first call s | load + sample s | "
                  "second call s | peak MB | load | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sec["rows"]:
            note = r.get("error", "") or ("the goal row" if r.get("goal_configuration") else "")
            params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "-"
            lines.append(f"| {r['name']} | {params} | "
                         f"{_f(r.get('load_seconds'), 2)} | {_f(r.get('first_call_seconds'), 2)} | "
                         f"{_f(r.get('load_and_sample_seconds'), 2)} | {_f(r.get('second_call_seconds'), 2)} | "
                         f"{_f(r.get('peak_memory_mb'))} | {_load(r)} | {note} |")
    goals = results.get("goals")
    if goals:
        lines += ["", "### Goals (issue 7)", "", "| goal | target | measured | measured on | status |",
                  "|---|---|---|---|---|"]
        for g in goals:
            val = g["measured"]
            shown = "-" if val is None else (_pct(val) if g["unit"].startswith("of ") else _f(val, 2))
            target = _pct(g["target"]) if g["unit"].startswith("of ") else f"{g['target']:,} {g['unit']}"
            on = g.get("measured_on") or "-"
            for name, gp in (g.get("generate_path") or {}).items():
                on += f"; generate, {name}: {_f(gp['measured'], 2)}"
            lines.append(f"| {g['what']} | {g['direction']} {target} | {shown} | {on} | {g['status']} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults depend on the device: " + json.dumps(DEFAULTS))
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--preset", default=None, help="UNet preset: tiny | small | base (default: base on CUDA, small on CPU)")
    p.add_argument("--vq-preset", default=None, help="VQModel preset (default: the same as --preset)")
    p.add_argument("--example-vq-preset", default=None,
                   help="the VQModel the example-style UNet row encodes every batch with (default: `wide`, the "
                        "seed's size, where --vq-preset is base, as in every example-style figure so far; else "
                        "--vq-preset)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="UNet training batch sizes (the first one gets the ablation)")
    p.add_argument("--vq-batch-sizes", type=int, nargs="+")
    p.add_argument("--sample-batch-sizes", type=int, nargs="+", help="pipeline-call sampling rows")
    p.add_argument("--generate-batch-sizes", type=int, nargs="+",
                   help="the `generate` rows' batch (= images per call; generate's own default is 256 on CUDA)")
    p.add_argument("--sampling-paths", nargs="+", default=list(SAMPLING_PATHS), choices=SAMPLING_PATHS,
                   help="pipeline: the pipeline called directly; generate: what `adni-diffusers generate` runs")
    p.add_argument("--cpu-goal-presets", nargs="+",
                   help=f"presets of the CPU goal rows (the goal is judged on {CPU_GOAL_PRESET!r})")
    p.add_argument("--encode-batch-sizes", type=int, nargs="+")
    p.add_argument("--encode-images", type=int, help="images encoded by the latent-cache benchmark")
    p.add_argument("--steps", type=int, help="timed training steps per row and repeat")
    p.add_argument("--repeats", type=int, help="timed blocks of --steps per training row (median reported, spread shown)")
    p.add_argument("--warmup", type=int,
                   help="untimed training steps first (compiled rows were compiled earlier, in maybe_compile's probe)")
    p.add_argument("--ddpm-steps", type=int, help="DDPM sampling steps actually run (1000 on CUDA)")
    p.add_argument("--sample-repeats", type=int, help="timed calls per sampling row (median reported)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--matmul-size", type=int)
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (with an eager fallback)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode for the sampling rows, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="only the UNet / VQ training rows with these variant names (the JSON's \"variant\"), "
                        "e.g. a separate process for a batch size that may crash the compiler")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over --profile-steps more steps of the UNet and VQ 'ours' rows (first batch size)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-variants", nargs="+", default=None, metavar="NAME",
                   help="with --profile: profile these rows (variant names) instead of the 'ours' row, e.g. an EMA row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--smoke", action="store_true", help="tiny preset, 1 step each: seconds, for CI (numbers mean nothing)")
    p.add_argument("--out", default=None,
                   help="write the JSON here (default: print it after the table); until the run ends, finished rows "
                        "are kept in <out without .json>.partial.json")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    opts = p.parse_args(argv)
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    defaults = DEFAULTS["smoke" if opts.smoke else opts.device]
    for key, value in defaults.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    opts.vq_preset = opts.vq_preset or opts.preset
    opts.example_vq_preset = opts.example_vq_preset or ("wide" if opts.vq_preset == "base" else opts.vq_preset)
    for flag, names in (("--variants", opts.variants), ("--profile-variants", opts.profile_variants)):
        unknown = sorted(set(names or ()) - set(UNET_VARIANTS) - set(VQ_VARIANTS))
        if unknown:
            p.error(f"{flag}: unknown {unknown}; known: {sorted(set(UNET_VARIANTS) | set(VQ_VARIANTS))}")
        cuda = opts.device == "cuda"
        blocked = {n: why for n in names or () if (why := row_blocked(n, opts.compile, cuda))}
        if blocked:
            p.error(f"{flag}: " + "; ".join(f"{n!r} {why}" for n, why in blocked.items()))
    for key in ("batch_sizes", "vq_batch_sizes", "sample_batch_sizes", "encode_batch_sizes", "generate_batch_sizes"):
        if any(b < 1 for b in getattr(opts, key)):
            p.error(f"--{key.replace('_', '-')}: batch sizes must be positive")
    if opts.steps < 1 or opts.repeats < 1 or opts.warmup < 0 or opts.ddpm_steps < 1 or opts.sample_repeats < 1:
        p.error("--steps, --repeats, --ddpm-steps and --sample-repeats must be >= 1, --warmup >= 0")
    if opts.encode_images < 1 or opts.matmul_size < 1 or opts.profile_steps < 1:  # else a row fails after its timing
        p.error("--encode-images, --matmul-size and --profile-steps must be >= 1")
    if opts.threads is not None and opts.threads < 1:  # (0 was ignored; a negative one failed in torch's words)
        p.error(f"--threads {opts.threads}: expected at least 1")
    # each failed in a traceback: a preset after the matmul measurement, an output path after every row had run
    from adni_diffusers.presets import PresetError, unet_config, vq_config

    for flag, presets, config_of in (("--preset", [opts.preset], unet_config),
                                     ("--vq-preset", [opts.vq_preset], vq_config),
                                     ("--example-vq-preset", [opts.example_vq_preset], vq_config),
                                     ("--cpu-goal-presets", opts.cpu_goal_presets, unet_config),
                                     ("--cpu-goal-presets", opts.cpu_goal_presets, vq_config)):
        for preset in presets:
            try:
                config_of(preset)
            except PresetError as e:
                p.error(f"{flag}: {e}")
    for flag, path in (("--out", opts.out), ("--markdown", opts.markdown)):
        if path is None:
            continue
        if Path(path).is_dir():
            p.error(f"{flag} {path}: is a folder; expected a file name")
        blocking = next((q for q in Path(path).absolute().parents if q.exists() and not q.is_dir()), None)
        if blocking is not None:
            p.error(f"{flag} {path}: {blocking} is a file, not a folder")
    return opts


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    device = torch.device(opts.device)
    partial = Path(opts.out).with_suffix(".partial.json") if opts.out else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
    bench = Bench(device, partial)
    if bench.cuda:  # TF32 for every fp32 matmul/conv, as the example style and facts.md's baseline use
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True  # (cudnn.benchmark stays off, as in the training scripts)
    started = time.perf_counter()
    results = {"machine": machine_info(bench, ["benchmarks/run.py", *argv]),
               "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "markdown")},
               "memory_kind": bench.memory_kind()}
    print(f"[benchmark] {results['machine']['device_name']}: measuring the matmul rate", file=sys.stderr)
    sizes = matmul_sizes(opts.matmul_size, bench.cuda)
    start_rate = matmul_rate(bench, opts.matmul_size, sizes=sizes)
    results["matmul"] = start_rate  # (the partial record's rows are shares of this one)
    rates = Rates(start_rate, bench.cuda)
    print("[benchmark] counting FLOPs", file=sys.stderr)
    results["flops"] = flops = model_flops(bench, opts)
    bench.header = dict(results)
    for section, fn in (("unet", lambda: bench_unet(bench, opts, flops, rates)),
                        ("latent_cache", lambda: bench_latent_cache(bench, opts, flops, rates)),
                        ("vq", lambda: bench_vq(bench, opts, flops, rates)),
                        ("sampling", lambda: bench_sampling(bench, opts, flops, rates)),
                        ("cpu_goal", lambda: bench_cpu_goal(bench, opts))):
        if section not in opts.sections or (section == "cpu_goal" and bench.cuda):
            continue
        t0 = time.perf_counter()
        print(f"[benchmark] section {section}", file=sys.stderr)
        bench.section = section
        results[section] = fn()
        results.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
    # measured again at the end, the higher kept: a rate measured while the machine was busy is no peak, and
    # every row's MFU is worked out again against the final one (an MFU above 100% is reported as invalid)
    print("[benchmark] measuring the matmul rate again", file=sys.stderr)
    results["matmul"] = keep_higher(start_rate, matmul_rate(bench, opts.matmul_size, sizes=sizes))
    rates = Rates(results["matmul"], bench.cuda)
    for section in ("unet", "latent_cache", "vq", "sampling"):
        for row in results.get(section, {}).get("rows", []):
            rates.refresh(row)
    if "unet" in results:
        results["unet"]["summary"] = unet_summary(results["unet"]["rows"], opts.batch_sizes)
    if "vq" in results:
        results["vq"]["summary"] = vq_summary(results["vq"]["rows"])
    results["goals"] = evaluate_goals(results, opts, bench)
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    table = markdown(results)
    print(table)
    text = json.dumps(results, indent=2, default=str)
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(text + "\n")
        partial.unlink(missing_ok=True)  # the full record replaces the row-by-row one
        print(f"[benchmark] JSON written to {opts.out}", file=sys.stderr)
    else:
        print(text)
    if opts.markdown:
        Path(opts.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.markdown).write_text(table)
    return results


if __name__ == "__main__":
    main()
