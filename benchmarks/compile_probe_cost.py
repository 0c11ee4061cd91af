"""What the `--compile` child process costs: train_unet's start with and without the child, early or late.

On CUDA `training.maybe_compile` lets a child process compile and run one training step before the
training process compiles (adni_diffusers/compile_probe.py). This times a real `train_unet` run (one
training step) three times, each in a fresh process with an empty inductor cache of its own: compiling in
process only (what CPU runs do); with the child started when the compile is due, after the latent cache
(as before 2026-11-26, tenth session); with the child started before the latent cache is built, running
beside it (what CUDA runs do now). The two child runs are forced on any device. Per run: the whole
`train_unet.main`, `maybe_compile` within it, and `compile_seconds` from its training_args.json (the
child's span, the wait for it, the compile here).

    python benchmarks/compile_probe_cost.py --vqmodel VQ_DIR --train_data_dir AD_NC --preset small \
        --train-batch-size 8 [--mixed-precision bf16] [--modes ...] --out benchmarks/results/cpu-DATE-compile-probe-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


MODES = ("in process only", "child when the compile is due", "child started early")


def run_one(mode: str, opts) -> dict:
    """In this process: one train_unet step with --compile, the child as `mode` says."""
    import torch

    from adni_diffusers import compile_probe, train_unet, training

    compile_probe.needed = lambda spec: mode != "in process only"
    if mode == "child when the compile is due":  # maybe_compile starts the child from the spec, when it gets there
        training.start_compile_check = lambda args, spec: spec if args.compile and compile_probe.needed(spec) else None
    maybe_compile, seconds = training.maybe_compile, {}

    def timed_maybe_compile(*args, **kwargs):
        started = time.time()
        model = maybe_compile(*args, **kwargs)
        seconds["maybe_compile"] = time.time() - started
        return model

    training.maybe_compile = timed_maybe_compile
    out = opts.work / "out"
    argv = ["--vqmodel", opts.vqmodel, "--train_data_dir", opts.train_data_dir, "--output_dir", out,
            "--preset", opts.preset, "--train_batch_size", str(opts.train_batch_size), "--max_train_steps", "1",
            "--compile", "--mixed_precision", opts.mixed_precision, "--latent_cache_dir", opts.work / "latents",
            "--num_sample_images", "1", "--save_images_epochs", "1000", "--lr_warmup_steps", "0", "--report_to", "none"]
    started = time.time()
    train_unet.main(train_unet.parse_args([str(a) for a in argv]))
    seconds["train_unet.main"] = time.time() - started
    result = {k: round(v, 1) for k, v in seconds.items()}
    result["compile_seconds"] = json.loads((out / "training_args.json").read_text()).get("compile_seconds")
    result["threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vqmodel", required=True)
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--train-batch-size", dest="train_batch_size", type=int, default=8)
    p.add_argument("--mixed-precision", dest="mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=None, help="JSON file for the result")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # set for the two child runs
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.mode:
        print(json.dumps(run_one(opts.mode, opts)), flush=True)
        return 0

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import _git, cpu_model  # benchmarks/run.py's machine description and commit

    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
              "git": _git("rev-parse", "--short", "HEAD") or "unknown",
              "machine": f"{cpu_model()}, {os.cpu_count()} cores"
                         + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
              "torch": torch.__version__, "preset": opts.preset, "train_batch_size": opts.train_batch_size,
              "mixed_precision": opts.mixed_precision, "runs": {}}
    for mode in opts.modes:
        with tempfile.TemporaryDirectory(prefix="compile_probe_cost_") as tmp:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
            done = subprocess.run([sys.executable, __file__, "--vqmodel", opts.vqmodel, "--train_data_dir",
                                   opts.train_data_dir, "--preset", opts.preset, "--train-batch-size",
                                   str(opts.train_batch_size), "--mixed-precision", opts.mixed_precision,
                                   "--mode", mode, "--work", tmp],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{mode}: failed\n{done.stderr[-3000:]}")
            result["runs"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, result["runs"][mode], flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
