"""Both training scripts under `accelerate launch` with 2 real CPU processes (gloo DDP).

They share their Accelerate code (adni_diffusers/training.py), so one test checks both:
world size 2, disjoint shards of every epoch, identical weights on both ranks after every step.
And the silent failure mode from facts.md (2 processes that are not data-parallel) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, TINY_UNET_ARGS, TINY_VQ_ARGS, run_training_script

pytestmark = pytest.mark.slow


def launch(script, args: list, use_cpu: bool = True, timeout: int = 400, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 (`processes`) processes of `script` (relative to the repo, or an absolute path)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO_ROOT / script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def read_traces(out) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / "trace" / f"rank-{r}.jsonl").read_text().splitlines()]
            for r in range(2)]


@pytest.mark.parametrize("script", ["train_vqmodel.py", "train_unet.py"])
def test_two_processes_are_data_parallel(script, tmp_path, demo_root, tiny_vq):
    """One epoch (no --max_train_steps) on 2 processes: 24 training images at 2 x 2 per step are 6 steps. The
    linear learning-rate schedule ends at 0 on the last one (it was computed from all 12 batches of the
    unsharded loader and ended at half the rate)."""
    out = tmp_path / "out"
    steps = 6
    if script == "train_vqmodel.py":
        args = ["--train_data_dir", demo_root, "--output_dir", out, *TINY_VQ_ARGS, "--train_batch_size", "2"]
    else:
        args = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out, *TINY_UNET_ARGS,
                "--conditional", "--train_batch_size", "2", "--latent_cache_dir", tmp_path / "cache"]
    if script == "train_vqmodel.py":  # float32 on the CPU all the same, and one warning that says so
        args += ["--mixed_precision", "fp16"]
    proc = launch(script, [*args, "--num_epochs", "1", "--lr_scheduler", "linear", "--trace_batches",
                           "--checkpointing_steps", "2"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    # each warning once, from the main process: it came once per process
    assert proc.stderr.count("does nothing on the CPU") == (script == "train_vqmodel.py"), proc.stderr[-3000:]

    rank0, rank1 = read_traces(out)
    assert len(rank0) == len(rank1) == steps
    for a, b in zip(rank0, rank1):
        assert a["world_size"] == b["world_size"] == 2
        assert a["step"] == b["step"]
        assert len(a["indices"]) == len(b["indices"]) == 2  # per-process batch
        assert not set(a["indices"]) & set(b["indices"]), f"step {a['step']}: both ranks got {a['indices']}"
        assert a["weights_checksum"] == b["weights_checksum"], f"weights diverged at step {a['step']}"
    # within the epoch no image is seen twice, across both ranks
    seen = [i for a, b in zip(rank0, rank1) for i in a["indices"] + b["indices"]]
    assert len(seen) == len(set(seen)) == steps * 4
    # the weights did change: a real training run
    assert rank0[0]["weights_checksum"] != rank0[-1]["weights_checksum"]
    assert (out / ("vqvae" if script == "train_vqmodel.py" else "model_index.json")).exists()
    assert (out / "checkpoint-2").is_dir()
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    # (each row's lr is the rate its step trained at: the last of 6 linear steps at 1/6 of the peak, not 7/12)
    record = json.loads((out / "training_args.json").read_text())
    assert history[-1]["step"] == steps and history[-1]["lr"] == pytest.approx(record["learning_rate"] / steps), history
    assert history[0]["lr"] > 0
    # the record names the global batch and the rate it trained at, which the flags alone do not
    record = json.loads((out / "training_args.json").read_text())
    assert record["num_processes"] == 2 and record["global_batch_size"] == 4
    assert record["learning_rate_used"] == record["learning_rate"]  # no --scale_lr
    # the logged loss is the mean over both processes' shards (it was rank 0's alone), here over 2 logged steps
    for row in history:
        own = [r["loss"] for trace in (rank0, rank1) for r in trace if row["step"] - 2 < r["step"] <= row["step"]]
        assert len(own) == 4 and row["loss"] == pytest.approx(sum(own) / 4, rel=1e-5), (row, own)

    if script == "train_unet.py":  # a requeued job on 1 process: the LR schedule goes on where it was
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
        shutil.copy(out / "training_args.json", resumed)  # as in the run's own folder
        run_training_script("train_unet", [*args[:4], "--output_dir", resumed, *args[6:], "--max_train_steps", steps,
                                           "--lr_scheduler", "linear", "--checkpointing_steps", "2",
                                           "--resume_from_checkpoint", "latest"])
        again = [json.loads(line) for line in (resumed / "logs" / "history.jsonl").read_text().splitlines()]
        lrs = {row["step"]: row["lr"] for row in history}
        assert [row["lr"] for row in again if row["step"] > 2] == [lrs[s] for s in sorted(lrs) if s > 2]
        # the record says the first 2 steps ran on 2 processes (it said 1 for all of them)
        record = json.loads((resumed / "training_args.json").read_text())
        assert record["num_processes"] == 1 and record["started_at_step"] == 2 and record["global_batch_size"] == 2
        assert [(s["started_at_step"], s["changed"].get("num_processes")) for s in record["earlier_sessions"]] == [
            (0, 2)]


def test_two_processes_without_cpu_flag_are_refused(tmp_path, demo_root):
    """`--multi_gpu --num_processes 2` on a machine with no GPU: each process would train alone on all data."""
    proc = launch("train_vqmodel.py", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_VQ_ARGS,
                                       "--max_train_steps", "2"], use_cpu=False)
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 but Accelerate sees 1 process" in proc.stderr
    assert not (tmp_path / "out" / "vqvae").exists()


def answers_of_two_processes(tmp_path, body: str, timeout: int = 120) -> list[str]:
    """Run `body` on 2 processes (gloo); it makes an Accelerator named `acc` and sets `answer`. Each rank's
    answer, read from a file of its own (not one shared stdout)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\n" + body
        + "Path(sys.argv[1], f'rank{acc.process_index}.txt').write_text(str(answer))\n"
        "acc.wait_for_everyone()\n"
        "import os, torch.distributed\n"
        "torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left at shutdown\n"
        # once (2026-12-06, a full CI run) a rank still aborted in the interpreter's own teardown ("terminate called
        # without an active exception", exit -6) after its answer was written; these tests ask about the answers only
        "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n")
    proc = launch(script, [tmp_path], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_compile_decision_is_the_same_on_every_process(tmp_path):
    """With --compile on CUDA each process asks its own child process; if one child fails, every process
    trains eager (one process compiled and one not would still agree on gradients, but not on speed or
    on what training_args says). Here rank 0's child passes and rank 1's fails."""
    answers = answers_of_two_processes(tmp_path, (
        "from accelerate import Accelerator\n"
        "from adni_diffusers.training import _every_process_agrees\n"
        "acc = Accelerator()  # as the training scripts start (it reads ACCELERATE_USE_CPU)\n"
        "assert acc.num_processes == 2\n"
        "answer = f'all={_every_process_agrees(acc.process_index == 0)} same={_every_process_agrees(True)}'\n"))
    assert answers == ["all=False same=True"] * 2


def test_a_compile_probe_failing_in_one_process_makes_every_process_train_eager(tmp_path):
    """The in-process probe (a compiled step before training) failed on rank 1 only (an out-of-memory, a compile
    worker crash): rank 1 trained eager, rank 0 compiled, and rank 0's probe all-reduce met rank 1's first real
    step: gradients averaged with the probe's, then a hang until --ddp_timeout. Now: no all-reduce in the probe,
    and both train eager, in step."""
    answers = answers_of_two_processes(tmp_path, (
        "import types, torch\n"
        "from accelerate import Accelerator\n"
        "from adni_diffusers import compile_probe, training\n"
        "compile_probe.compile_model = lambda m, mode: torch.compile(m, backend='eager')  # fast, same control flow\n"
        "acc = Accelerator()\n"
        "assert acc.num_processes == 2\n"
        "torch.manual_seed(0)\n"
        "model, opt = acc.prepare(torch.nn.Linear(4, 1), torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), 0.1))\n"
        "def probe(m):\n"
        "    if acc.process_index == 1:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory (simulated, rank 1 only)')\n"
        "    m(torch.ones(2, 4)).sum().backward()\n"
        "args = types.SimpleNamespace(compile=True, compile_mode=None, train_batch_size=2)\n"
        "m = training.maybe_compile(model, args, probe=probe)\n"
        "acc.backward(m(torch.full((2, 4), float(acc.process_index + 1))).sum())\n"
        "answer = f'{m is model} {model.module.weight.grad.tolist()}'\n"), timeout=180)
    # both eager, and the first real step's gradient is the mean of the two ranks' inputs (1 and 2) x batch 2
    assert answers == ["True [[3.0, 3.0, 3.0, 3.0]]"] * 2, answers


def test_checkpoint_waits_for_every_process_before_the_rename(tmp_path):
    """Each process writes its own random_states_<i>.pkl into checkpoint-N.tmp; the main process renamed the
    folder as soon as its own part was written, so a slower rank 1 crashed ("Parent directory ... does not exist")
    and the checkpoint lacked its file. Here rank 1 is 3 s late."""
    script = tmp_path / "late.py"
    script.write_text(
        "import sys, time\n"
        "import torch, accelerate.accelerator as aa\n"
        "from accelerate import Accelerator\n"
        "from adni_diffusers import training\n"
        "acc = Accelerator()\n"
        "assert acc.num_processes == 2\n"
        "acc.prepare(torch.nn.Linear(2, 2))\n"
        "real = aa.save_accelerator_state\n"
        "def late(*a, **k):\n"
        "    if acc.process_index == 1:\n"
        "        time.sleep(3)\n"
        "    return real(*a, **k)\n"
        "aa.save_accelerator_state = late\n"
        "training.save_checkpoint(acc, sys.argv[1], 2, {'tensors': {}, 'meta': {}}, None)\n"
        "acc.wait_for_everyone()\n"
        "import torch.distributed\n"
        "torch.distributed.destroy_process_group()\n")
    proc = launch(script, [tmp_path / "out"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_a_node_local_cache_is_built_once_per_machine(tmp_path):
    """Two machines of two processes each (LOCAL_RANK as accelerate launch sets it on each machine), each with a
    cache folder of its own ($TMPDIR: a node-local --latent_cache_dir): the main process builds machine 0's, then
    machine 1's first process builds machine 1's, and the others read them. Under `main_process_first` alone both
    processes of machine 1 found their cache empty and encoded the whole set at once."""
    script = tmp_path / "machines.py"
    script.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "os.environ['LOCAL_RANK'] = str(int(os.environ['RANK']) % 2)  # machine RANK // 2, as on 2 nodes\n"
        "from accelerate import Accelerator\n"
        "from adni_diffusers import training\n"
        "acc = Accelerator()\n"
        "assert acc.num_processes == 4 and acc.local_process_index == acc.process_index % 2\n"
        "cache = Path(sys.argv[1], f'machine{acc.process_index // 2}.cache')\n"
        "with training.main_process_then_each_node_first(acc):\n"
        "    if not cache.exists():\n"
        "        time.sleep(1)  # the encoding\n"
        "        with open(Path(sys.argv[1], 'built_by'), 'a') as f:\n"
        "            f.write(f'{acc.process_index}\\n')\n"
        "        cache.write_text('latents')\n"
        "acc.wait_for_everyone()\n"
        "import torch.distributed\n"
        "torch.distributed.destroy_process_group()\n")
    proc = launch(script, [tmp_path], timeout=180, processes=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((tmp_path / "built_by").read_text().split()) == ["0", "2"]


def test_a_clean_failure_of_the_main_process_is_not_a_traceback_on_the_others(tmp_path):
    """The main process alone builds the cache, evaluates and pushes: when that fails with a TrainingError (one
    line), the process waiting at the barrier saw gloo's "Connection closed by peer" and printed a 40-line
    traceback under it. Now it says in one line that another process ended."""
    script = tmp_path / "fail_on_main.py"
    script.write_text(
        "import sys\n"
        "from accelerate import Accelerator\n"
        "from adni_diffusers import training\n"
        "def main(args):\n"
        "    accelerator = Accelerator()\n"
        "    accelerator.wait_for_everyone()\n"
        "    if accelerator.is_main_process:\n"
        "        raise training.TrainingError('push failed: no network')\n"
        "    accelerator.wait_for_everyone()\n"
        "sys.exit(training.run_cli('fail_on_main.py', lambda argv: None, main))\n")
    proc = launch(script, [], timeout=120)
    assert proc.returncode != 0
    assert "fail_on_main.py: error: push failed: no network" in proc.stderr
    assert "[rank1]: Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]


def test_a_stop_signal_to_one_process_stops_both_at_one_checkpointed_step(tmp_path, demo_root, tiny_vq):
    """A scheduler's SIGTERM may reach the processes at different moments, or (here) one of them only: they agree
    at the next log flush, both checkpoint that step and stop. Data workers ignore it (they would die first)."""
    out = tmp_path / "out"
    script = tmp_path / "signalled_train_unet.py"
    script.write_text(
        "import os, signal, sys\n"
        "from adni_diffusers import train_unet, training\n"
        "original = training.TrainingRun.end_step\n"
        "def end_step(self, logs):\n"
        "    if self.global_step == 2 and self.accelerator.process_index == 1:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    original(self, logs)\n"
        "training.TrainingRun.end_step = end_step\n"
        "sys.exit(train_unet.cli())\n")
    proc = launch(script, ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out, *TINY_UNET_ARGS,
                           "--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "100",
                           "--dataloader_num_workers", "1", "--trace_batches", "--latent_cache_dir", tmp_path / "cache"])
    assert proc.returncode != 0
    assert f"stopped by a stop signal (on another process) at step 4; {out / 'checkpoint-4'} is written" in \
        proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"] and not (out / "model_index.json").exists()
    assert [[row["step"] for row in rank] for rank in read_traces(out)] == [[1, 2, 3, 4]] * 2


def test_a_one_process_batch_job_under_accelerate_launch_is_told_its_launcher_kills_early(tmp_path):
    """From accelerate 1.16, `accelerate launch` without --multi_gpu answers SIGTERM by killing the run 5 s after
    passing it on: a time limit's SIGTERM then left no checkpoint (measured on CPU: killed at step 49 of a run
    logging every 100). A batch job of one process is told to start with `python train_*.py`; the same job without
    the launcher is not. (The run stops at its missing data folder, after the warning.)"""
    import accelerate.commands.launch

    if not hasattr(accelerate.commands.launch, "_terminate_process_tree"):
        pytest.skip("this accelerate's one-process launcher waits for its process")
    env = dict(os.environ, SLURM_JOB_ID="7", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    flags = ["--train_data_dir", str(tmp_path / "no_data"), "--output_dir", str(tmp_path / "out"), "--preset", "tiny"]
    script = str(REPO_ROOT / "train_vqmodel.py")
    # (and a launcher flag accelerate passes on to DeepSpeed alone: said, not silently dropped)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--gradient_accumulation_steps",
                               "2", script, *flags],
                              env=env, capture_output=True, text=True, timeout=300)
    alone = subprocess.run([sys.executable, script, *flags], env=env, capture_output=True, text=True, timeout=300)
    for proc in (launched, alone):
        assert "--train_data_dir" in proc.stderr and "folder does not exist" in proc.stderr, proc.stderr[-3000:]
    assert "kills it 5 s after passing on a SIGTERM" in launched.stderr
    assert "Start one-process jobs with `python train_vqmodel.py` and the same flags" in launched.stderr
    assert "kills it 5 s" not in alone.stderr
    assert "`accelerate launch --gradient_accumulation_steps` is passed on to DeepSpeed alone: this run accumulates " \
           "the script's --gradient_accumulation_steps (1)" in launched.stderr
    assert "passed on to DeepSpeed" not in alone.stderr


def test_an_error_every_process_meets_is_printed_once(tmp_path, demo_root):
    """A bad flag, argparse's own usage error and an unreadable image stop every process alike: each said it once
    per process (argparse's 50-line usage twice). The main process says it; the others stop with the same status."""
    out = tmp_path / "out"
    # (a TrainingError of the flags, --val_fraction 2, takes the bad image's way below: one launch fewer)
    proc = launch("train_vqmodel.py", ["--output_dir", out, "--no_such_flag"], timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("usage: train_vqmodel.py") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error: unrecognized arguments: --no_such_flag") == 1, proc.stderr[-3000:]
    data = tmp_path / "AD_NC"
    shutil.copytree(demo_root, data)
    broken = sorted((data / "train" / "AD").iterdir())[0]
    broken.write_bytes(b"not an image")
    proc = launch("train_vqmodel.py", ["--train_data_dir", data, "--output_dir", out, *TINY_VQ_ARGS], timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{broken}: not a readable image file") == 1, proc.stderr[-3000:]
    # the main process printed it, and failed first (torchrun's "root cause"); the other left with status 2
    summary = proc.stderr.split("Root Cause")[-1]
    assert "rank      : 0 (local_rank: 0)" in summary and "exitcode  : 2" in summary, summary
    assert "exitcode  : 2" in proc.stderr.split("Root Cause")[0].split("Failures:")[-1], proc.stderr[-3000:]
    assert not out.exists()


def test_a_non_finite_loss_on_one_process_is_said_once(tmp_path, demo_root):
    """A NaN in one process's loss: every process sees it in the all-reduced logs and stops at the same step with
    the same TrainingError, which each printed."""
    out = tmp_path / "out"
    script = tmp_path / "nan_train_vqmodel.py"
    script.write_text(
        "import os, sys\n"
        "from adni_diffusers import vq, train_vqmodel\n"
        "real, calls = vq.vq_training_loss, []\n"
        "def poisoned(*a, **k):\n"
        "    calls.append(1)\n"
        "    loss, out, logs = real(*a, **k)\n"
        "    if len(calls) == 2 and os.environ['RANK'] == '1':\n"
        "        loss = loss * float('nan')\n"
        "    return loss, out, logs\n"
        "vq.vq_training_loss = poisoned\n"
        "sys.exit(train_vqmodel.cli())\n")
    proc = launch(script, ["--train_data_dir", demo_root, "--output_dir", out, *TINY_VQ_ARGS, "--train_batch_size",
                           "2", "--max_train_steps", "3", "--logging_steps", "1", "--checkpointing_steps", "1"])
    assert proc.returncode != 0
    message = f"train_vqmodel.py: error: non-finite grad_norm, loss at step 2: training stopped. The last good " \
              f"checkpoint is {out / 'checkpoint-1'}"
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0], proc.stderr[-3000:]


def test_a_killed_process_is_said_by_the_main_process_with_where_to_go_on(tmp_path):
    """Another process killed (the OOM killer, kill -9) prints nothing: the main process, waiting for it in a
    collective, printed gloo's 25-line "Connection closed by peer" traceback and not where to resume."""
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    script = tmp_path / "killed.py"
    script.write_text(
        "import argparse, os, signal, sys\n"
        "from accelerate import Accelerator\n"
        "from adni_diffusers import training\n"
        "def main(args):\n"
        "    accelerator = Accelerator()\n"
        "    accelerator.wait_for_everyone()\n"
        "    if accelerator.process_index == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    accelerator.wait_for_everyone()\n"
        "parse = lambda argv: argparse.Namespace(output_dir=sys.argv[1])\n"
        "sys.exit(training.run_cli('killed.py', parse, main))\n")
    proc = launch(script, [out], timeout=120)
    assert proc.returncode != 0
    assert "killed.py: stopped: another process ended (its error, if any, is above; the launcher's summary below " \
           "gives its exit code): " in proc.stderr, proc.stderr[-3000:]
    assert f"; the last checkpoint is {out / 'checkpoint-4'}: go on from it with --resume_from_checkpoint latest" \
        in proc.stderr, proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_wait_past_ddp_timeout_says_the_flag(tmp_path):
    """The main process's own work (latent cache, validation, sample grid, final evaluation, push) outlasted
    --ddp_timeout: the waiting process printed gloo's 25-line traceback ending in "Timed out waiting 5000ms for recv
    operation to complete", which names no flag. Now one line naming --ddp_timeout and where to go on."""
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    script = tmp_path / "slow_main.py"
    script.write_text(
        "import argparse, sys, time\n"
        "from datetime import timedelta\n"
        "from accelerate import Accelerator, InitProcessGroupKwargs\n"
        "from adni_diffusers import training\n"
        "def main(args):\n"
        "    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=2))])\n"
        "    accelerator.wait_for_everyone()\n"
        "    if accelerator.is_main_process:\n"
        "        time.sleep(20)  # the launcher stops it once the other has failed\n"
        "    accelerator.wait_for_everyone()\n"
        "parse = lambda argv: argparse.Namespace(output_dir=sys.argv[1], ddp_timeout=2)\n"
        "sys.exit(training.run_cli('slow_main.py', parse, main))\n")
    proc = launch(script, [out], timeout=120)
    assert proc.returncode != 0
    assert "slow_main.py: process 1 stopped: it waited --ddp_timeout 2 s for another process" in proc.stderr, \
        proc.stderr[-3000:]
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in proc.stderr
    assert "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
