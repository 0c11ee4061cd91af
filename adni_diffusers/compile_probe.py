"""Try `torch.compile` in a child process before the training process compiles (CUDA only).

A CUDA error inside a compiled kernel (facts.md: "misaligned address" in an inductor GroupNorm backward
at batch 512) leaves the CUDA context unusable, so the process that hit it cannot fall back to eager. So
on CUDA the training scripts first let a child process build the same model from its config, compile it
with the same mode and run one training step's forward and backward (three in a mode with CUDA graphs) at the
training batch size, precision and memory format; the training process compiles only if the child exits 0,
and trains eager otherwise. The scripts start the child early (`ChildStep`), so that it compiles while they
decode the slices or build the latent cache.
The child's weights are random: a compiler failure depends on shapes, dtypes and layouts, not on values.
Inductor's on-disk cache makes the training process's own compile of the same graphs cheaper.
A step that passed is remembered in that cache folder (`remember_pass`): a rerun or a resume with the same
model, batch, precision, layout, mode, GPU and software skips the child (`passed_before`).

    python -m adni_diffusers.compile_probe SPEC.json     # what `passes_in_child` runs
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

logger = logging.getLogger("adni_diffusers.compile_probe")

FAILURE_MARK = "compile probe failed: "
TIMEOUT_S = 1800  # the `base` UNet's first compiled step took under 2 minutes on the H100 (2026-11-25)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# modes that record CUDA graphs: torch records at the second call and replays from the third, so the child
# runs three steps in them and a failure while recording or replaying also costs the child, not the run
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
PARENT_VARIABLE = "ADNI_DIFFUSERS_COMPILE_CHECK_PARENT"  # the training process's pid, for the child to watch
SPEC_FOLDER_PREFIX = "adni_compile_probe_"  # ChildStep's temporary folder for the spec and the child's stderr


def compile_model(model, mode: str | None):
    """`torch.compile` with a --compile_mode value ("default" is torch's own default): the child and the
    training process compile the same way."""
    return torch.compile(model, mode=None if mode in (None, "default") else mode)


def make_spec(stage: str, config: dict, args, accelerator, sample_shape) -> dict:
    """What the child needs to repeat one training step: the model (stage + config), the batch (training
    batch size, one sample's shape), the precision and device Accelerate chose (--mixed_precision or the
    `accelerate launch` config), memory format and compile mode."""
    return {"stage": stage, "config": dict(config), "batch_size": int(args.train_batch_size),
            "sample_shape": [int(s) for s in sample_shape], "mixed_precision": str(accelerator.mixed_precision),
            "channels_last": bool(args.channels_last), "compile_mode": getattr(args, "compile_mode", None),
            # the kernels the training process picks with them (TF32 GEMM templates, cuDNN autotuning)
            "allow_tf32": bool(getattr(args, "allow_tf32", False)),
            "cudnn_benchmark": bool(getattr(args, "cudnn_benchmark", False)),
            "device": str(accelerator.device)}


def needed(spec: dict) -> bool:
    """Only a CUDA error ends the process that hits it; elsewhere the in-process fallback is enough."""
    return spec["device"].startswith("cuda")


def passed_before(spec: dict) -> Path | None:
    """The record of a child that ran this very step before, or None. The kernels inductor makes depend on
    the spec (not on the device index), the GPU, torch/CUDA/triton/diffusers and the step's code: the record's
    name is a hash of all of these."""
    record, what = _pass_record(spec)
    try:
        text = record.read_text()
    except OSError:  # none (or no folder that could hold one)
        return None
    try:
        if json.loads(text) == json.loads(json.dumps(what)):  # tuples are read back as lists
            return record
    except ValueError:
        pass
    # empty or cut short (a crash before its data reached the disk): no record, or --compile would skip the child
    # and compile in the training process, where a CUDA error ends the run
    with contextlib.suppress(OSError):
        record.unlink()
    return None


def remember_pass(spec: dict) -> None:
    """Write the record `passed_before` looks for. Only a saving: a folder that cannot take it costs the next
    run a child, not this run."""
    record, what = _pass_record(spec)
    _write_record(record, what, "that this step passed")
    with contextlib.suppress(OSError):  # a pass now outweighs an earlier CUDA-graph failure of this very step
        _graphs_failed_path(record).unlink(missing_ok=True)


def remember_graphs_failed(spec: dict, why: str) -> None:
    """Remember that this step failed with CUDA graphs (`spec`'s mode) while it passed without them, so that a
    rerun that did not ask for CUDA graphs (train_unet's default mode) goes without them at once instead of
    waiting for the same failure again (a child of 2-3 minutes for the `base` UNet)."""
    record, what = _pass_record(spec)
    _write_record(_graphs_failed_path(record), {**what, "why": why}, "that CUDA graphs failed in this step")


def graphs_failed_before(spec: dict) -> str | None:
    """Why this very step failed with CUDA graphs in a child before (`remember_graphs_failed`), or None."""
    record, what = _pass_record(spec)
    try:
        recorded = json.loads(_graphs_failed_path(record).read_text())
        why = recorded.pop("why")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return why if recorded == json.loads(json.dumps(what)) else None


def _graphs_failed_path(record: Path) -> Path:
    return record.with_name(f"{record.stem}.graphs-failed.json")


def _write_record(record: Path, what: dict, words: str) -> None:
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(what, indent=2))
        tmp.replace(record)  # whole or absent, also with several processes writing the same record
    except OSError as e:
        with contextlib.suppress(OSError):  # (a full disk: not a half file left per process id)
            tmp.unlink(missing_ok=True)
        logger.warning("--compile: could not remember %s (%s); the next run checks it again", words, e)


def _pass_record(spec: dict) -> tuple[Path, dict]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    device = torch.device(spec["device"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
    code = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes()
                                   for name in ("compile_probe.py", "diffusion.py", "vq.py"))).hexdigest()
    # "default" is no mode (compile_model): --compile and --compile_mode default, and reduce-overhead's fallback,
    # compile the same step and share the record
    mode = None if spec.get("compile_mode") == "default" else spec.get("compile_mode")
    what = {"spec": {**{k: v for k, v in spec.items() if k != "device"}, "compile_mode": mode}, "gpu": gpu,
            "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": installed("triton"), "diffusers": installed("diffusers"),
            "code": code,
            # inductor's settings from the environment (e.g. TORCHINDUCTOR_FORCE_LAYOUT_OPT) change its kernels too
            "inductor_env": {k: v for k, v in sorted(os.environ.items())
                             if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR"}}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return _inductor_cache_dir() / "adni_diffusers_compile_checks" / f"{key}.json", what


def _inductor_cache_dir() -> Path:
    """Where inductor keeps its compiled kernels (TORCHINDUCTOR_CACHE_DIR, or its default under /tmp): a record
    goes away with the kernels it vouches for."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # a torch that keeps it elsewhere: its documented variable, or its default
        import getpass

        return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                    or Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
    return Path(cache_dir())


def child_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "adni_diffusers.compile_probe", str(spec_path)]


def passes_in_child(spec: dict, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(True, "") when the child's compiled training step ran; else (False, why) in one line."""
    return ChildStep(spec, timeout_s).result()


class ChildStep:
    """The child's compiled training step, started at once and answered by `result()`: the training process
    does other work meanwhile (decoding the slices, building the latent cache) instead of waiting for it.
    The child leads its own process group (with inductor's compile workers); whatever way this object goes (an
    answer, `cancel()`, garbage collection, the interpreter's exit after an error), the group is killed and the
    spec's folder removed."""

    def __init__(self, spec: dict, timeout_s: float = TIMEOUT_S):
        self.spec, self.timeout_s = spec, timeout_s
        folder = tempfile.TemporaryDirectory(prefix=SPEC_FOLDER_PREFIX)
        spec_path = Path(folder.name) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        # a file, not a pipe: a pipe nobody reads fills up. UTF-8 both ways (the child's PYTHONIOENCODING)
        stderr = open(Path(folder.name) / "stderr.txt", "w+", encoding="utf-8", errors="replace")
        self.started = time.time()
        self._process = subprocess.Popen(child_command(spec_path), stdout=subprocess.DEVNULL, stderr=stderr,
                                         env=_child_environment(), start_new_session=True)
        self._stderr = stderr
        self._answer = None
        self.finished = None  # time.time() when the answer was collected
        self._cleanup = weakref.finalize(self, _stop_child, self._process, stderr, folder)

    def result(self) -> tuple[bool, str]:
        """Wait for the child (until `timeout_s` after its start): (True, "") if its step ran, else (False, why)."""
        if self._answer is None:
            try:
                returncode = self._process.wait(timeout=max(0.0, self.started + self.timeout_s - time.time()))
                self._stderr.seek(0)
                why = "" if returncode == 0 else _why(returncode, self._stderr.read())
                self._answer = (returncode == 0, why)
                if returncode == 0:
                    remember_pass(self.spec)
            except subprocess.TimeoutExpired:
                self._answer = (False, f"no answer in {self.timeout_s:.0f} s")
            self.finished = time.time()
            self._cleanup()
        return self._answer

    def cancel(self) -> None:
        self._cleanup()


def _stop_child(process: subprocess.Popen, stderr, folder: tempfile.TemporaryDirectory) -> None:
    if process.poll() is None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(process.pid, signal.SIGKILL)  # the child and the compile workers it started
            else:  # Windows: no process groups (start_new_session is ignored there)
                process.kill()
        except ProcessLookupError:
            pass
        process.wait()
    stderr.close()
    folder.cleanup()


def repeatable_failure(why: str) -> bool:
    """Whether a child's failure says something about the step itself, which a rerun would meet again: not out of
    memory (other work on the GPU), no answer in time (a cold compile) or the kernel's OOM killer (SIGKILL)."""
    return not (ran_out_of_memory(why) or why.startswith("no answer in") or "killed by SIGKILL" in why)


def ran_out_of_memory(why: str) -> bool:
    """A child that failed for want of GPU memory: it may fit once the training process's own work is done."""
    return "OutOfMemoryError" in why or "out of memory" in why.lower()


def _child_environment() -> dict:
    """This process's environment, with this package first on the path: the child runs the same code even
    where the package is not installed (`python /path/to/train_unet.py` from another folder)."""
    package_parent = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, PARENT_VARIABLE: str(os.getpid()), "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"}


def _why(returncode: int, stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith(FAILURE_MARK):
            return line[len(FAILURE_MARK):]
    if returncode < 0:  # killed by a signal: a crash in native code, or the kernel's OOM killer
        try:
            return f"the child process was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"the child process was killed by signal {-returncode}"
    last = [line for line in stderr.splitlines() if line.strip()]
    return f"exit code {returncode}" + (f": {last[-1].strip()}" if last else "")


def run_training_step(spec: dict) -> int:
    """Training steps of the compiled model the spec describes (the child's work): one, or three in a mode with
    CUDA graphs (warm-up, record, replay). Each step is the training loop's: forward, backward, gradient
    clipping, a fused AdamW step on CUDA, `zero_grad(set_to_none=True)`. Without the last one the child would
    accumulate gradients across steps, which CUDA graphs forbid (the next replay overwrites the gradients the
    previous one left): on 2026-11-26 that failed the child on an H200 although the training loop was fine.
    Returns the number of steps run."""
    from diffusers import UNet2DModel, VQModel

    from .diffusion import diffusion_loss, make_noise_scheduler
    from .vq import VQTrainingModel, reconstruction_loss

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if device.type == "cuda" and spec.get("allow_tf32"):  # as make_accelerator sets them in the training process
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and spec.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    if spec["stage"] == "unet":
        model = UNet2DModel(**spec["config"])
    elif spec["stage"] == "vqmodel":
        model = VQTrainingModel(VQModel(**spec["config"]))
    else:
        raise ValueError(f"unknown stage {spec['stage']!r} (expected 'unet' or 'vqmodel')")
    model = model.to(device)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    dtype = _AUTOCAST.get(spec["mixed_precision"])
    if dtype is not None:
        _wrap_forward_as_accelerate_does(model, device, dtype)
    compiled = compile_model(model, spec["compile_mode"])

    generator = torch.Generator(device=device).manual_seed(0)
    noise_scheduler = make_noise_scheduler() if spec["stage"] == "unet" else None
    num_labels = spec["config"].get("num_class_embeds")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=(device.type == "cuda") or None)
    steps = 3 if spec["compile_mode"] in CUDA_GRAPH_MODES else 1
    for _ in range(steps):
        x = torch.randn(spec["batch_size"], *spec["sample_shape"], device=device, generator=generator)
        if spec["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if spec["stage"] == "unet":
            labels = (torch.randint(0, num_labels, (len(x),), device=device, generator=generator)
                      if num_labels else None)
            loss = diffusion_loss(compiled, noise_scheduler, x, labels, generator, channels_last=spec["channels_last"])
        else:
            loss = reconstruction_loss(compiled(x).recon, x, "mse")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a kernel's error is reported asynchronously: make it surface here
    return steps


def _wrap_forward_as_accelerate_does(model, device, dtype) -> None:
    """Mixed precision as `Accelerator.prepare_model` applies it: autocast and fp32 outputs inside `forward`.
    Then the child compiles the same graph as the training process, and inductor's on-disk cache can serve
    the training process's compile (an autocast around the call instead left half of it to redo on CPU)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    autocast_forward = torch.autocast(device_type=device.type, dtype=dtype)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(autocast_forward), model)


def _stop_with_parent(spec_path: Path) -> None:
    """The training process can end without stopping this child (SIGKILL, a scheduler's SIGTERM, which skips
    Python's exit hooks): then stop too, with the compile workers this child's process group holds, instead of
    compiling on for minutes on a GPU someone may be starting the next run on. The spec's folder, which that
    process would have removed, goes too (only one `ChildStep` made: never a spec file of the user's)."""
    import shutil
    import threading

    if not hasattr(os, "killpg"):  # Windows: an orphan keeps its parent's id there, and there are no groups
        return
    parent = int(os.environ.get(PARENT_VARIABLE) or os.getppid())  # set by ChildStep: right even if it died already
    folder = spec_path.resolve().parent
    ours = PARENT_VARIABLE in os.environ and folder.name.startswith(SPEC_FOLDER_PREFIX)

    def watch():
        while os.getppid() == parent:  # an orphan is adopted by another process
            time.sleep(1.0)
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    _stop_with_parent(Path(argv[0]))
    try:
        run_training_step(spec)
    except Exception as e:  # noqa: BLE001 - report any failure in one line, then the traceback
        first_line = str(e).splitlines()[0] if str(e) else ""
        print(f"{FAILURE_MARK}{type(e).__name__}: {first_line}", file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
