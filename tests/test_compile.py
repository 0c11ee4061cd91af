"""--compile / --compile_mode / --cudnn_benchmark: the compiled training path and its fallbacks (CPU)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_UNET_ARGS, TINY_VQ_ARGS, run_training_script, wait_until

from adni_diffusers.presets import UNET_PRESETS


@pytest.fixture(autouse=True)
def _own_pass_records(monkeypatch, tmp_path):
    """Each test starts with no record of a passed child (compile_probe.passed_before): one test's pass
    would otherwise let another skip the child it is about."""
    from adni_diffusers import compile_probe

    monkeypatch.setattr(compile_probe, "_inductor_cache_dir", lambda: tmp_path / "inductor")


def _args(**kw):
    return SimpleNamespace(**{"compile": True, "compile_mode": None, "train_batch_size": 2, **kw})


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU())


def test_compiler_failure_falls_back_to_eager(caplog):
    from adni_diffusers.training import maybe_compile

    model = _tiny_model()

    def probe(m):
        m(torch.randn(2, 1, 8, 8)).sum().backward()
        raise RuntimeError("InductorError: something the compiler could not do")

    with caplog.at_level(logging.WARNING):
        assert maybe_compile(model, _args(), probe=probe) is model
    assert "torch.compile failed" in caplog.text and "training eager" in caplog.text
    assert all(p.grad is None for p in model.parameters())  # the probe's gradients are not a training step


@pytest.mark.parametrize("message", [
    "CUDA error: misaligned address\nCUDA kernel errors might be asynchronously reported",
    "Triton Error [CUDA]: misaligned address",  # Triton's launcher: how most inductor kernels report it
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
])
def test_cuda_error_in_probe_stops_with_advice(message):
    """The GPU is unusable in this process after a CUDA fault: training eager here would fail less clearly."""
    from adni_diffusers.training import TrainingError, maybe_compile

    def probe(m):
        raise RuntimeError(message)

    first_line = message.splitlines()[0]
    with pytest.raises(TrainingError, match=rf"batch size 512 hit a CUDA error \({re.escape(first_line)}\)"
                                            r".*Rerun without --compile"):
        maybe_compile(_tiny_model(), _args(train_batch_size=512), probe=probe)


def _spec(stage="unet", **kw):
    from adni_diffusers.compile_probe import make_spec
    from adni_diffusers.presets import UNET_PRESETS, VQ_PRESETS

    config = {**UNET_PRESETS["tiny"], "sample_size": 8, "num_class_embeds": 3} if stage == "unet" else VQ_PRESETS["tiny"]
    args = SimpleNamespace(train_batch_size=2, channels_last=False, compile_mode=None)
    accelerator = SimpleNamespace(mixed_precision="no", device=torch.device("cpu"))
    shape = (4, 8, 8) if stage == "unet" else (1, 32, 32)
    return {**make_spec(stage, config, args, accelerator, shape), **kw}


@pytest.mark.parametrize("stage", ["unet", "vqmodel"])
def test_child_step_builds_the_model_the_spec_describes(monkeypatch, stage):
    """The child's work, in this process and eager (torch.compile replaced): model from the config, a batch of
    the training shape, forward, backward. The real compiled child runs in the next test."""
    from adni_diffusers import compile_probe

    compiled, before = [], {}

    def fake_compile(model, mode=None):
        compiled.append(model)
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_probe.run_training_step(_spec(stage, mixed_precision="bf16", channels_last=True))
    (model,) = compiled
    assert type(model).__name__ == {"unet": "UNet2DModel", "vqmodel": "VQTrainingModel"}[stage]
    last = "conv_out.weight" if stage == "unet" else "vq.decoder.conv_out.weight"
    assert not torch.equal(model.state_dict()[last], before[last])  # backward and an optimizer step ran


@pytest.mark.parametrize("mode, steps", [(None, 1), ("default", 1), ("reduce-overhead", 3), ("max-autotune", 3),
                                         ("max-autotune-no-cudagraphs", 1)])
def test_child_runs_past_cuda_graph_recording(monkeypatch, mode, steps):
    """In a mode with CUDA graphs torch records at the second call and replays from the third: the child runs
    three steps there, so a failure while recording or replaying also ends the child and not the run. Every
    step starts without gradients, as in the training loop (zero_grad(set_to_none=True)): gradients kept from
    one step to the next are what CUDA graphs overwrite (the child's failure on the H200, 2026-11-26)."""
    from adni_diffusers import compile_probe

    grads_clear_at_forward = []

    def fake_compile(model, mode=None):
        model.register_forward_pre_hook(
            lambda m, _: grads_clear_at_forward.append(all(p.grad is None for p in m.parameters())))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert compile_probe.run_training_step(_spec("unet", compile_mode=mode)) == steps
    assert grads_clear_at_forward == [True] * steps


# on one pytest-xdist worker, one after the other: the child's compile fills inductor's cache, which then serves the
# compiled training run (two cold compiles at once on two workers took 161 s and 109 s of a 2-core runner)
INDUCTOR_CACHE_SHARED = pytest.mark.xdist_group("inductor_tiny_unet")
# The UNet of the two: one level, no attention. Each fused kernel is a g++ run on inductor's CPU backend, and the
# tiny preset's two levels with attention cost 117 s + 83 s of compiling with a cold cache (2 cores, 2026-12-07).
COMPILED_UNET = {**UNET_PRESETS["tiny"], "block_out_channels": [16], "down_block_types": ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"], "add_attention": False}


@INDUCTOR_CACHE_SHARED
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_child_process_compiles_a_training_step():
    """The child that train_unet / train_vqmodel start on CUDA before compiling, here on inductor's CPU
    backend (about a minute on 2 cores with a cold cache): it builds the model from the config, compiles it,
    runs its training steps (three: the mode is reduce-overhead) and exits 0. Its model, batch and mode are
    those of `test_compiled_training_run_matches_eager`'s compiled run, whose compile inductor's on-disk cache
    then serves, as it serves the training process after the child on a GPU."""
    from adni_diffusers.compile_probe import passes_in_child

    config = {**COMPILED_UNET, "in_channels": 4, "out_channels": 4, "sample_size": 32,  # as train_unet sets
              "num_class_embeds": 3}  # (--conditional: AD, NC and "no label")
    spec = _spec("unet", config=config, batch_size=4, sample_shape=[4, 32, 32], compile_mode="reduce-overhead",
                 channels_last=True)
    assert passes_in_child(spec) == (True, "")


def test_child_process_failure_is_one_clear_line():
    from adni_diffusers.compile_probe import passes_in_child

    passed, why = passes_in_child(_spec(stage="gan"))
    assert not passed and why == "ValueError: unknown stage 'gan' (expected 'unet' or 'vqmodel')"


def test_child_runs_this_package_even_where_it_is_not_installed(monkeypatch):
    import os

    import adni_diffusers
    from adni_diffusers.compile_probe import _child_environment

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    path = _child_environment()["PYTHONPATH"].split(os.pathsep)
    assert path == [str(Path(adni_diffusers.__file__).resolve().parents[1]), "/somewhere/else"]


@pytest.mark.parametrize("child, expected", [
    ("import os; os.abort()", "the child process was killed by SIGABRT"),  # what a native crash looks like
    ("import sys; print('Traceback', file=sys.stderr); print('boom', file=sys.stderr); sys.exit(3)", "exit code 3: boom"),
    ("import time; time.sleep(30)", "no answer in 1 s"),
])
def test_child_process_that_dies_or_hangs_means_no_compile(monkeypatch, child, expected):
    import sys

    from adni_diffusers import compile_probe

    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [sys.executable, "-c", child])
    timeout_s = 1 if "sleep" in child else 60  # the crashing children get time to start on a loaded runner
    assert compile_probe.passes_in_child(_spec(), timeout_s=timeout_s) == (False, expected)


def test_child_started_early_runs_while_this_process_works(monkeypatch, tmp_path):
    """`ChildStep` starts the child at once: it finishes its work before anyone asks for the answer (the
    training process decodes slices or builds the latent cache meanwhile), and the answer is kept."""
    import sys

    from adni_diffusers import compile_probe

    done = tmp_path / "child finished"
    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [
        sys.executable, "-c", f"import pathlib; pathlib.Path({str(done)!r}).write_text('yes')"])
    child = compile_probe.ChildStep(_spec())
    wait_until(done.exists, 60)  # "other work", without asking the child anything
    assert done.exists()
    assert child.result() == (True, "") and child.result() == (True, "") and child.finished >= child.started


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed orphan may wait unreaped where PID 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("ending", ["cancel", "garbage collected", "timeout"])
def test_child_and_its_workers_are_killed_when_not_waited_for(monkeypatch, tmp_path, ending):
    """A run that fails after starting the child (bad data, no room for the latents), a child past its time:
    the child and the processes it started (inductor's compile workers) are killed, its files removed."""
    import gc
    import sys

    from adni_diffusers import compile_probe

    pids, spec_paths = tmp_path / "pids", []
    # the child starts a process of its own (as inductor's compile workers are), writes both pids, then hangs
    script = (f"import os, subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}'); time.sleep(120)")
    monkeypatch.setattr(compile_probe, "child_command",
                        lambda spec_path: spec_paths.append(spec_path) or [sys.executable, "-c", script])
    child = compile_probe.ChildStep(_spec(), timeout_s=2 if ending == "timeout" else 600)
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, 60)
    child_pid, worker_pid = map(int, pids.read_text().split())
    assert _alive(child_pid) and _alive(worker_pid) and spec_paths[0].exists()
    if ending == "cancel":
        child.cancel()
    elif ending == "garbage collected":
        del child
        gc.collect()
    else:
        assert child.result() == (False, "no answer in 2 s")
    wait_until(lambda: not (_alive(child_pid) or _alive(worker_pid)), 10)
    assert not _alive(child_pid) and not _alive(worker_pid)
    assert not spec_paths[0].parent.exists()


def test_child_stops_when_the_training_process_is_killed(tmp_path):
    """A training process killed outright (SIGKILL; a scheduler's SIGTERM skips exit hooks too) cannot stop
    its child: the child notices that its parent is gone and stops, instead of compiling on, and removes the spec's
    folder that the parent would have. The child here is the real one (`python -m adni_diffusers.compile_probe`),
    with a step that compiles for a minute or more."""
    import os
    import signal
    import subprocess
    import sys

    child_pid_file = tmp_path / "child.pid"
    training_process = tmp_path / "train.py"
    training_process.write_text(
        "import json, sys, time\n"
        "from adni_diffusers import compile_probe\n"
        "child = compile_probe.ChildStep(json.loads(sys.argv[1]))\n"
        "open(sys.argv[2], 'w').write(f'{child._process.pid} {child._process.args[-1]}')\n"
        "time.sleep(300)\n")
    cold_cache = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # a long compile for sure
    parent = subprocess.Popen([sys.executable, str(training_process), json.dumps(_spec()), str(child_pid_file)],
                              env=cold_cache)
    try:
        wait_until(lambda: child_pid_file.exists() and child_pid_file.read_text(), 60)
        child_pid, spec_path = child_pid_file.read_text().split(" ", 1)
        child_pid, spec_folder = int(child_pid), Path(spec_path).parent
        assert _alive(child_pid) and spec_folder.is_dir()
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    wait_until(lambda: not _alive(child_pid), 45, every=0.1)  # the child's imports, then one look a second at its parent
    assert not _alive(child_pid) and not spec_folder.exists()


def test_failed_child_probe_trains_eager_without_compiling_here(monkeypatch, caplog):
    """A CUDA error in the child leaves this process's GPU usable: train eager, and do not compile here."""
    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile

    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)  # as on CUDA
    monkeypatch.setattr(compile_probe, "passes_in_child",
                        lambda spec: (False, "RuntimeError: CUDA error: misaligned address"))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled after the child failed"))
    model = _tiny_model()
    with caplog.at_level(logging.WARNING):
        assert maybe_compile(model, _args(train_batch_size=512), probe=lambda m: pytest.fail("probed in process"),
                             child_probe=_spec()) is model
    assert ("torch.compile failed in the child process's training step at batch size 512 "
            "(RuntimeError: CUDA error: misaligned address); training eager") in caplog.text


@pytest.mark.parametrize("mode, without, second_child_passes", [
    ("reduce-overhead", "default", True), ("max-autotune", "max-autotune-no-cudagraphs", True),
    ("reduce-overhead", "default", False), ("default", None, None)])
def test_cuda_graph_mode_failing_in_the_child_tries_without_cuda_graphs(monkeypatch, caplog, mode, without,
                                                                       second_child_passes):
    """The H200 run of 2026-11-26 trained eager when its reduce-overhead child failed; the default mode would
    have run. A CUDA-graph mode that fails in the child is tried once more without CUDA graphs, then eager."""
    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile

    tried, compiled_modes = [], []
    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)  # as on CUDA
    monkeypatch.setattr(compile_probe, "passes_in_child", lambda spec: tried.append(spec["compile_mode"]) or (
        (True, "") if spec["compile_mode"] == without and second_child_passes else (False, f"{spec['compile_mode']} broke")))
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled_modes.append(mode) or model)
    args, model = _args(compile_mode=mode), _tiny_model()
    with caplog.at_level(logging.WARNING):
        maybe_compile(model, args, probe=lambda m: None, child_probe=_spec(compile_mode=mode))
    if without is None:  # no CUDA graphs to leave out: one child, then eager
        assert tried == [mode] and compiled_modes == [] and "(default broke); training eager" in caplog.text
    elif second_child_passes:
        assert tried == [mode, without] and args.compile_mode == without
        assert compiled_modes == [None if without == "default" else without]  # compiled here, without CUDA graphs
        assert args.compile_mode_fallback == f"{mode} -> {without}: {mode} broke"  # in training_args.json
        assert f"--compile_mode {mode} failed in the child" in caplog.text and "training eager" not in caplog.text
    else:
        assert tried == [mode, without] and compiled_modes == [] and args.compile_mode == mode
        assert f"({without} broke); training eager" in caplog.text


def test_passed_child_probe_then_compiles_here(monkeypatch):
    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile

    specs = []
    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)  # as on CUDA
    monkeypatch.setattr(compile_probe, "passes_in_child", lambda spec: specs.append(spec) or (True, ""))
    model, probed, args = _tiny_model(), [], _args()
    compiled = maybe_compile(model, args, probe=lambda m: probed.append(m), child_probe=_spec())
    assert compiled is not model and probed == [compiled] and specs == [_spec()]
    assert set(args.compile_seconds) == {"child_processes", "waited_for_child", "first_step_here"}  # each part's cost


@pytest.mark.parametrize("early_answer, children_started_now", [
    ((True, ""), []),
    ((False, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"), ["default"]),
    ((False, "RuntimeError: CUDA error: misaligned address"), []),
])
def test_child_started_early_is_the_one_answered(monkeypatch, caplog, early_answer, children_started_now):
    """`maybe_compile` takes the child that `start_compile_check` started and starts no other, except once
    when that child ran out of GPU memory beside this process's latent-cache build: alone it may fit."""
    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile

    started_now = []
    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)  # as on CUDA
    monkeypatch.setattr(compile_probe, "passes_in_child",
                        lambda spec: started_now.append(spec["compile_mode"] or "default") or (True, ""))
    early = _SimulatedChild(_spec())
    early.result = lambda: early_answer
    args = _args()
    with caplog.at_level(logging.WARNING):
        compiled = maybe_compile(_tiny_model(), args, probe=lambda m: None, child_probe=early)
    assert started_now == children_started_now
    trains_compiled = early_answer[0] or bool(children_started_now)
    assert (not isinstance(compiled, torch.nn.Sequential)) == trains_compiled
    assert ("ran out of GPU memory beside this process's work" in caplog.text) == bool(children_started_now)
    assert args.compile_seconds["waited_for_child"] <= args.compile_seconds["child_processes"]


def test_the_spec_carries_the_kernel_choosing_flags():
    from adni_diffusers.compile_probe import make_spec

    args = SimpleNamespace(train_batch_size=2, channels_last=False, compile_mode=None, allow_tf32=True,
                           cudnn_benchmark=True)
    spec = make_spec("unet", {}, args, SimpleNamespace(mixed_precision="no", device="cpu"), (4, 8, 8))
    assert spec["allow_tf32"] is True and spec["cudnn_benchmark"] is True


def test_an_empty_or_cut_short_record_is_no_pass():
    """A record left empty or cut short by a crash counted as a pass (only its name was looked at): --compile then
    skipped the child and compiled in the training process, where a CUDA error ends the run, on every rerun."""
    from adni_diffusers import compile_probe

    compile_probe.remember_pass(_spec())
    record = compile_probe.passed_before(_spec())
    assert record is not None
    for damaged in ("", '{"spec": {"trunc'):
        record.write_text(damaged)
        assert compile_probe.passed_before(_spec()) is None and not record.exists()
        compile_probe.remember_pass(_spec())


def test_a_record_that_cannot_be_written_leaves_no_half_file(monkeypatch, caplog):
    """A full disk while writing a pass record: a warning, and no <key>.<pid>.tmp left in the cache folder."""
    from pathlib import Path

    from adni_diffusers import compile_probe

    real_write = Path.write_text

    def full_disk(self, text, *a, **k):
        real_write(self, text[:5], *a, **k)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_disk)
        compile_probe.remember_pass(_spec())
    assert "could not remember" in caplog.text
    record = compile_probe._pass_record(_spec())[0]
    assert not list(record.parent.glob("*.tmp")) and not record.exists()


def test_no_mode_and_the_default_mode_share_a_record():
    """--compile and --compile_mode default compile the same step (compile_model), but had two records: a
    reduce-overhead run's fallback ("default") passed, and the next plain --compile run started a child again."""
    from adni_diffusers import compile_probe

    compile_probe.remember_pass(_spec(compile_mode="default"))
    assert compile_probe.passed_before(_spec(compile_mode=None)) is not None
    assert compile_probe.passed_before(_spec(compile_mode="max-autotune")) is None


def test_a_step_that_passed_before_needs_no_child(monkeypatch, caplog):
    """A rerun or a resume of the same training step (model, batch, precision, mode, GPU, software) skips
    the child: a child that passed leaves a record beside inductor's cache; a failed one leaves none."""
    import sys

    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile, start_compile_check

    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [sys.executable, "-c", "raise SystemExit(1)"])
    assert compile_probe.ChildStep(_spec()).result()[0] is False and compile_probe.passed_before(_spec()) is None
    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [sys.executable, "-c", "pass"])
    assert compile_probe.ChildStep(_spec()).result() == (True, "")
    record = compile_probe.passed_before(_spec())
    assert record is not None and json.loads(record.read_text())["torch"] == torch.__version__
    for other in (_spec(batch_size=512), _spec(compile_mode="reduce-overhead"), _spec(mixed_precision="bf16"),
                  _spec("vqmodel"), _spec(allow_tf32=True), _spec(cudnn_benchmark=True)):
        # (the spec carries --allow_tf32 and --cudnn_benchmark: they change the kernels a GPU run picks)
        assert compile_probe.passed_before(other) is None  # another step: another record
    with monkeypatch.context() as m:  # inductor's own settings from the environment make other kernels
        m.setenv("TORCHINDUCTOR_FORCE_LAYOUT_OPT", "1")
        assert compile_probe.passed_before(_spec()) is None
    assert compile_probe.passed_before(_spec()) is not None

    unwritable = Path(compile_probe._inductor_cache_dir()) / "a file"
    unwritable.write_text("")
    with monkeypatch.context() as m:  # a cache folder that cannot take the record: the run goes on
        m.setattr(compile_probe, "_inductor_cache_dir", lambda: unwritable)
        assert compile_probe.ChildStep(_spec()).result() == (True, "") and compile_probe.passed_before(_spec()) is None

    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)  # as on CUDA
    monkeypatch.setattr(compile_probe, "ChildStep", lambda *a, **k: pytest.fail("a child for a step that passed"))
    monkeypatch.setattr(compile_probe, "passes_in_child", lambda spec: pytest.fail("a child for a step that passed"))
    args = _args()
    check = start_compile_check(args, _spec())
    assert check == _spec()  # nothing started: maybe_compile decides, with the other processes
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        compiled = maybe_compile(_tiny_model(), args, probe=lambda m: None, child_probe=check)
    assert not isinstance(compiled, torch.nn.Sequential) and "passed in a child process before" in caplog.text
    assert args.compile_seconds["child_processes"] < 5


def test_on_cpu_no_child_process_is_started(monkeypatch):
    from adni_diffusers import compile_probe
    from adni_diffusers.training import maybe_compile

    monkeypatch.setattr(compile_probe, "passes_in_child", lambda spec: pytest.fail("a child process on CPU"))
    assert not compile_probe.needed(_spec()) and compile_probe.needed(_spec(device="cuda:1"))
    assert maybe_compile(_tiny_model(), _args(), probe=lambda m: None, child_probe=_spec()) is not None


def _architecture(model) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_") and k != "scaling_factor"}  # set after training


class _SimulatedChild:
    """compile_probe.ChildStep as the scripts see it on CUDA, answering "simulated failure"; `events` records
    when it starts and answers, between the scripts' data work."""

    events: list = []
    specs: list = []

    def __init__(self, spec, timeout_s=None):
        self.spec, self.started = spec, 0.0
        self.specs.append(json.loads(json.dumps(spec)))  # plain JSON, as the real child gets it
        self.events.append(f"{spec['stage']} child started")

    def result(self):
        self.events.append(f"{self.spec['stage']} child answered")
        return False, "simulated failure"

    def cancel(self):
        pass


def test_training_scripts_describe_their_model_to_the_child(monkeypatch, tmp_path, tiny_vq, demo_root, caplog):
    """The scripts' call site, as it runs on CUDA (the child's answer simulated): the spec is plain JSON and
    describes the model and batch that are trained (the UNet's class embedding from the class folders, known
    before the decode); the child runs while the slices are decoded (both stages) and the latent cache is built
    (UNet), not after; a failed child means an eager run that finishes."""
    from diffusers import UNet2DModel, VQModel

    from adni_diffusers import compile_probe, data, latents

    events = _SimulatedChild.events = []
    specs = _SimulatedChild.specs = []
    monkeypatch.setattr(compile_probe, "needed", lambda spec: True)
    monkeypatch.setattr(compile_probe, "ChildStep", _SimulatedChild)
    decode_all, encode_all = data.decode_all, latents.encode_all
    monkeypatch.setattr(data, "decode_all", lambda *a, **k: events.append("decoding slices") or decode_all(*a, **k))
    monkeypatch.setattr(latents, "encode_all", lambda *a, **k: events.append("encoding latents") or encode_all(*a, **k))
    with caplog.at_level(logging.WARNING):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              "--max_train_steps", "1", "--compile", "--mixed_precision", "bf16",
                                              *TINY_VQ_ARGS])
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                           tmp_path / "ldm", "--max_train_steps", "1", "--compile", "--conditional",
                                           "--latent_cache_dir", tmp_path / "cache", *TINY_UNET_ARGS])
    assert events == ["vqmodel child started", "decoding slices", "vqmodel child answered",
                      "unet child started", "decoding slices", "encoding latents", "encoding latents",
                      "unet child answered"]  # encoding: the training and the validation slices
    assert caplog.text.count("(simulated failure); training eager") == 2
    for out in ("vq", "ldm"):  # asked for --compile, trained eager: training_args.json says both
        saved = json.loads((tmp_path / out / "training_args.json").read_text())
        assert saved["compile"] is True and saved["compiled"] is False
    vq_spec, unet_spec = specs
    vq = VQModel.from_pretrained(tmp_path / "vq" / "vqvae")
    assert vq_spec["stage"] == "vqmodel" and vq_spec["batch_size"] == 4 and vq_spec["device"] == "cpu"
    assert (vq_spec["mixed_precision"], unet_spec["mixed_precision"]) == ("bf16", "no")  # what Accelerate chose
    assert _architecture(VQModel(**vq_spec["config"])) == _architecture(vq)
    assert vq_spec["sample_shape"] == [1, 256, 256]
    unet = UNet2DModel.from_pretrained(tmp_path / "ldm" / "unet")
    assert unet_spec["stage"] == "unet" and _architecture(UNet2DModel(**unet_spec["config"])) == _architecture(unet)
    assert unet_spec["config"]["num_class_embeds"] == 3  # AD, NC and "no label"
    assert unet_spec["sample_shape"] == [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]


@pytest.mark.parametrize("flags, message", [
    (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
    (["--compile", "--compile_mode", "reduce-overhead", "--gradient_accumulation_steps", "2"],
     "--compile_mode reduce-overhead (CUDA graphs) cannot be combined with --gradient_accumulation_steps 2"),
])
def test_compile_flags_are_checked_before_work(tmp_path, tiny_vq, demo_root, capsys, flags, message):
    from adni_diffusers import train_unet, train_vqmodel

    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), *flags, *TINY_UNET_ARGS])
    assert code == 2 and message in capsys.readouterr().err
    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "v"), *flags,
                              "--preset", "tiny"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "v").exists()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@INDUCTOR_CACHE_SHARED
def test_compiled_training_run_matches_eager(tmp_path, tiny_vq, demo_root, caplog):
    """The real train_unet path with --compile (inductor's CPU backend here), with the flags of gpu_session.sh's
    UNet stage: the probe compiles, training runs compiled without compiling again (the probe's input was NCHW
    and the step's channels_last until 2026-11-26: a second compile of 100+ s on an H100), also across an
    epoch's end with its sample grid and a checkpoint, and the trained weights agree with an eager run of the
    same seed."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    preset = tmp_path / "compiled_unet.json"
    preset.write_text(json.dumps(COMPILED_UNET))
    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--max_train_steps", "8",
              "--latent_cache_dir", tmp_path / "cache", "--cudnn_benchmark", *TINY_UNET_ARGS, "--preset", preset,
              "--channels_last", "--conditional", "--prediction_type", "v_prediction", "--snr_gamma", "5", "--use_ema",
              "--latents_on_device", "--checkpointing_steps", "4", "--num_sample_images", "1", "--save_images_epochs", "1"]
    run_training_script("train_unet", [*common, "--output_dir", tmp_path / "eager"])
    with caplog.at_level(logging.WARNING):
        run_training_script("train_unet", [*common, "--output_dir", tmp_path / "compiled", "--compile",
                                           "--compile_mode", "reduce-overhead"])
    assert "torch.compile failed" not in caplog.text  # it really trained compiled
    assert "more graph(s) during training" not in caplog.text
    assert json.loads((tmp_path / "compiled" / "train_metrics.json").read_text())["recompiled_graphs"] == 0
    assert "recompiled_graphs" not in json.loads((tmp_path / "eager" / "train_metrics.json").read_text())
    assert len(list((tmp_path / "compiled" / "samples").glob("samples-*.png"))) >= 2  # an epoch ended mid-run
    eager = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "eager").unet.state_dict()
    compiled = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "compiled").unet.state_dict()
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)
    compiled_args = json.loads((tmp_path / "compiled" / "training_args.json").read_text())
    assert compiled_args["compile_mode"] == "reduce-overhead" and compiled_args["compiled"] is True
    # no child process on CPU; the compile here is timed
    assert list(compiled_args["compile_seconds"]) == ["first_step_here"]
    assert compiled_args["compile_seconds"]["first_step_here"] > 0
    assert json.loads((tmp_path / "eager" / "training_args.json").read_text())["compiled"] is False


def test_a_pass_record_holds_for_every_device_index_of_the_same_gpu(monkeypatch):
    """Inductor's kernels depend on the GPU model, not on which index it has: a step that passed on cuda:0 needs no
    child on cuda:1 (another rank, or CUDA_VISIBLE_DEVICES changed). Another device kind is another record."""
    from adni_diffusers import compile_probe

    # the GPU's name as it would be on a machine with two of the same (and no real CUDA call for cuda:1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Same GPU")
    compile_probe.remember_pass(_spec(device="cuda:0"))
    assert compile_probe.passed_before(_spec(device="cuda:0")) is not None
    assert compile_probe.passed_before(_spec(device="cuda:1")) == compile_probe.passed_before(_spec(device="cuda:0"))
    assert compile_probe.passed_before(_spec(device="cpu")) is None


def test_a_compile_check_child_is_stopped_where_there_are_no_process_groups(monkeypatch, tmp_path):
    """Windows has no os.killpg: stopping a child still compiling (timeout, cancel, an error in training) raised
    AttributeError there and left it running on the GPU. Without process groups the child itself is killed."""
    import subprocess
    import sys
    import tempfile

    from adni_diffusers import compile_probe

    folder = tempfile.TemporaryDirectory(dir=tmp_path)
    stderr = open(Path(folder.name) / "stderr.txt", "w+", encoding="utf-8")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stderr=stderr)
    monkeypatch.delattr(os, "killpg")
    compile_probe._stop_child(child, stderr, folder)
    assert child.poll() is not None and not Path(folder.name).exists()


# ------------------------------------------------------------------ the UNet's compile mode on one GPU (2026-12-04)


@pytest.mark.parametrize("device, processes, accumulation, given, chosen", [
    ("cuda", 1, 1, None, "reduce-overhead"),      # measured: a whole train_unet run, 57 vs 86 ms a step (H200)
    ("cuda", 1, 1, "default", "default"),          # asked for: kept
    ("cuda", 1, 1, "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ("cpu", 1, 1, None, None),                     # no CUDA graphs on a CPU
    ("cuda", 2, 1, None, None),                    # DDP with CUDA graphs: not measured
    ("cuda", 1, 2, None, None),                    # CUDA graphs cannot accumulate gradients (refused when asked for)
])
def test_compile_without_a_mode_picks_cuda_graphs_only_where_measured(device, processes, accumulation, given, chosen):
    from adni_diffusers.training import choose_compile_mode, validate_training_arguments

    args = SimpleNamespace(compile=True, compile_mode=given, gradient_accumulation_steps=accumulation)
    accelerator = SimpleNamespace(device=torch.device(device), num_processes=processes)
    choose_compile_mode(args, accelerator, "reduce-overhead")
    assert args.compile_mode == chosen
    assert hasattr(args, "compile_mode_chosen") == (given is None and chosen is not None)  # in training_args.json
    uncompiled = SimpleNamespace(compile=False, compile_mode=None, gradient_accumulation_steps=1)
    choose_compile_mode(uncompiled, accelerator, "reduce-overhead")
    assert uncompiled.compile_mode is None  # nothing without --compile (validate refuses a mode without it)
    # what it picks passes the checks the flags passed before (accumulation with CUDA graphs is refused)
    full = train_unet_args_with(compile_mode=args.compile_mode, gradient_accumulation_steps=accumulation)
    validate_training_arguments(full)


def train_unet_args_with(**changes):
    from adni_diffusers import train_unet

    args = train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "d", "--output_dir", "o", "--compile"])
    vars(args).update(changes)
    return args


def test_train_unet_chooses_its_compile_mode_once_it_knows_the_device(tmp_path, tiny_vq, demo_root, monkeypatch):
    """train_unet asks for its measured mode before the compile check's child is specified (which takes the mode)."""
    from adni_diffusers import training

    seen = []

    class Chosen(Exception):
        pass

    def record(args, accelerator, measured_mode):
        seen.append((accelerator.device.type, measured_mode, args.compile_mode))
        args.compile_mode = measured_mode  # as on one GPU: the compile check must then check this mode

    def checked(args, spec):
        seen.append(spec["compile_mode"])
        raise Chosen

    monkeypatch.setattr(training, "choose_compile_mode", record)
    monkeypatch.setattr(training, "start_compile_check", checked)
    with pytest.raises(Chosen):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                           tmp_path / "o", "--compile", *TINY_UNET_ARGS])
    assert seen == [("cpu", "reduce-overhead", None), "reduce-overhead"]


def test_accumulation_set_in_accelerates_environment_is_refused_unless_the_flag_says_the_same(tmp_path, demo_root,
                                                                                                monkeypatch, capsys):
    """Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS over --gradient_accumulation_steps: the loop (and
    the CUDA-graph default, which needs no accumulation) read the flag, so the run would have accumulated unseen."""
    from adni_diffusers import train_vqmodel

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    common = ["--train_data_dir", str(demo_root), *TINY_VQ_ARGS, "--max_train_steps", "1"]
    code = train_vqmodel.cli([*common, "--output_dir", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "Accelerate accumulates gradients over 4 steps (ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4)" \
        in err and "--gradient_accumulation_steps is 1" in err
    assert not (tmp_path / "v").exists()  # refused before any work
    run_training_script("train_vqmodel", [*common, "--output_dir", tmp_path / "same", "--gradient_accumulation_steps", "4"])
    assert (tmp_path / "same" / "vqvae").is_dir()


@pytest.mark.parametrize("asked", [False, True])
def test_a_rerun_does_not_wait_again_for_cuda_graphs_that_failed_in_this_step(monkeypatch, asked):
    """train_unet's default mode (CUDA graphs on one GPU) that failed in the child is remembered: a rerun or resume
    compiles without CUDA graphs at once instead of waiting minutes for the same failure. Asked for with
    --compile_mode, CUDA graphs are tried again (the user may have changed something the record cannot see)."""
    import sys

    from adni_diffusers import compile_probe, train_unet, training

    child = ("import json, sys; mode = json.load(open(sys.argv[1]))['compile_mode']; "
             "print('compile probe failed: RuntimeError: graphs broke', file=sys.stderr) if mode else None; "
             "sys.exit(1 if mode == 'reduce-overhead' else 0)")
    started = []
    monkeypatch.setattr(compile_probe, "child_command", lambda path: started.append(
        json.loads(Path(path).read_text())["compile_mode"]) or [sys.executable, "-c", child, str(path)])
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=1, mixed_precision="bf16")
    for run in (1, 2):
        started.clear()
        args = train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "d", "--output_dir", "o", "--compile",
                                      *(["--compile_mode", "reduce-overhead"] if asked else [])])
        training.choose_compile_mode(args, accelerator, training.UNET_CUDA_COMPILE_MODE)
        check = training.start_compile_check(args, compile_probe.make_spec("unet", {"sample_size": 8}, args,
                                                                           accelerator, (4, 8, 8)))
        training.maybe_compile(_tiny_model(), args, probe=None, child_probe=check)
        assert args.compile_mode == "default" and "graphs broke" in args.compile_mode_fallback
        if run == 1 or asked:
            assert started == ["reduce-overhead", "default"] if run == 1 else ["reduce-overhead"]
        else:
            assert started == [] and args.compile_mode_fallback.endswith("(an earlier run)")


@pytest.mark.parametrize("failure, remembered", [
    ("graphs", True),    # e.g. "accessing tensor output of CUDAGraphs that has been overwritten"
    ("SIGSEGV", True),   # a crash in native code
    ("oom", False),      # other work on the GPU
    ("SIGKILL", False),  # the kernel's OOM killer
])
def test_only_a_failure_of_the_step_itself_is_remembered_and_a_later_pass_outweighs_it(monkeypatch, tmp_path, failure,
                                                                                      remembered):
    """Out of memory (other work on the GPU), a timeout or the OOM killer say nothing about CUDA graphs in this
    step: remembered, every later default run would train 35% slower for good. And once the CUDA-graph step passed
    (asked for with --compile_mode), the default goes back to it."""
    import sys

    from adni_diffusers import compile_probe, train_unet, training

    behaviour = tmp_path / "behaviour.json"  # mode -> what its child does
    child = ("import json, os, signal, sys; mode = json.load(open(sys.argv[1]))['compile_mode'] or 'default'; "
             "what = json.load(open(sys.argv[2]))[mode]; "
             "what == 'pass' and sys.exit(0); "
             "what in ('SIGSEGV', 'SIGKILL') and os.kill(os.getpid(), getattr(signal, what)); "
             "print('torch.OutOfMemoryError: CUDA out of memory' if what == 'oom' else "
             "'RuntimeError: accessing tensor output of CUDAGraphs that has been overwritten', file=sys.stderr); "
             "sys.exit(1)")
    started = []
    monkeypatch.setattr(compile_probe, "child_command", lambda path: started.append(
        json.loads(Path(path).read_text())["compile_mode"]) or [sys.executable, "-c", child, str(path), str(behaviour)])
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=1, mixed_precision="bf16")

    def run(*flags):
        started.clear()
        args = train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "d", "--output_dir", "o", "--compile",
                                      *flags])
        training.choose_compile_mode(args, accelerator, training.UNET_CUDA_COMPILE_MODE)
        spec = compile_probe.make_spec("unet", {"sample_size": 8}, args, accelerator, (4, 8, 8))
        training.maybe_compile(_tiny_model(), args, probe=None, child_probe=training.start_compile_check(args, spec))
        return args

    behaviour.write_text(json.dumps({"reduce-overhead": failure, "default": "pass"}))
    assert run().compile_mode == "default"
    graph_spec = compile_probe.make_spec("unet", {"sample_size": 8}, SimpleNamespace(
        train_batch_size=64, channels_last=False, compile_mode="reduce-overhead"), accelerator, (4, 8, 8))
    assert (compile_probe.graphs_failed_before(graph_spec) is not None) == remembered
    assert run().compile_mode == "default"
    if remembered:
        assert started == []  # straight to the mode without CUDA graphs
    else:
        assert started and set(started) == {"reduce-overhead"}  # CUDA graphs tried again (the default passed before)
    behaviour.write_text(json.dumps({"reduce-overhead": "pass", "default": "pass"}))  # the cause is gone
    assert run("--compile_mode", "reduce-overhead").compile_mode == "reduce-overhead"  # asked for: tried again
    assert compile_probe.graphs_failed_before(graph_spec) is None  # the pass removed the failure record
    assert run().compile_mode == "reduce-overhead" and started == []  # the default uses CUDA graphs again
    assert not compile_probe.repeatable_failure("no answer in 1800 s")  # a cold compile: not remembered either


# --- mutation audit 2026-12-05 (small modules)


def test_a_pass_record_is_kept_in_inductors_cache_folder(monkeypatch, tmp_path):
    """The record vouches for kernels inductor keeps: it lies in inductor's own cache folder (TORCHINDUCTOR_CACHE_DIR
    here), so that it goes away with them."""
    from adni_diffusers import compile_probe

    monkeypatch.undo()  # the real cache folder, not this file's fixture
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "kernels"))
    compile_probe.remember_pass(_spec())
    record = compile_probe.passed_before(_spec())
    assert record is not None and record.is_relative_to(tmp_path / "kernels")


def test_a_pass_record_is_for_one_gpu_model_and_one_software_stack(monkeypatch):
    """Inductor's kernels differ between GPU models and between versions of CUDA, triton and diffusers: a step that
    passed on one is checked again on another."""
    import importlib.metadata

    from adni_diffusers import compile_probe

    gpu, versions = ["GPU A"], {"triton": "3.0.0", "diffusers": "0.30.0"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu[0])
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    compile_probe.remember_pass(_spec(device="cuda:0"))
    assert compile_probe.passed_before(_spec(device="cuda:0")) is not None
    for change in (lambda: gpu.__setitem__(0, "GPU B"), lambda: monkeypatch.setattr(torch.version, "cuda", "12.8"),
                   lambda: versions.update(triton="3.1.0"), lambda: versions.update(diffusers="0.31.0")):
        change()
        assert compile_probe.passed_before(_spec(device="cuda:0")) is None
        compile_probe.remember_pass(_spec(device="cuda:0"))


def test_a_pass_record_is_for_the_code_of_the_step(monkeypatch, tmp_path):
    """The step's code (the probe, the diffusion loss, the VQ model) is part of the record: after an update of any of
    them the step is checked again."""
    import shutil

    from adni_diffusers import compile_probe

    package = Path(compile_probe.__file__).parent
    copy = tmp_path / "package"
    copy.mkdir()
    for name in ("compile_probe.py", "diffusion.py", "vq.py"):
        shutil.copy(package / name, copy / name)
    monkeypatch.setattr(compile_probe, "__file__", str(copy / "compile_probe.py"))
    for name in ("compile_probe.py", "diffusion.py", "vq.py"):
        compile_probe.remember_pass(_spec())
        assert compile_probe.passed_before(_spec()) is not None
        with open(copy / name, "a", encoding="utf-8") as f:
            f.write("\n# changed\n")
        assert compile_probe.passed_before(_spec()) is None, name


def test_only_cuda_needs_a_child_and_every_out_of_memory_message_may_fit_later():
    """A child only where a CUDA error ends the process (not MPS or XPU); CUDA's two ways of saying it ran out of
    memory (the caching allocator's OutOfMemoryError, a kernel's "CUDA error: out of memory") are not remembered."""
    from adni_diffusers import compile_probe

    assert [compile_probe.needed(_spec(device=d)) for d in ("cuda", "cuda:1", "cpu", "mps", "xpu:0")] == \
        [True, True, False, False, False]
    for why in ("OutOfMemoryError: Tried to allocate 2.00 GiB", "RuntimeError: CUDA error: out of memory"):
        assert compile_probe.ran_out_of_memory(why) and not compile_probe.repeatable_failure(why)
    assert compile_probe.repeatable_failure("RuntimeError: CUDA error: misaligned address")


def test_child_step_runs_the_training_precision_and_memory_format(monkeypatch):
    """The child compiles the graph the training process compiles: bf16 autocast inside the model's forward (as
    Accelerate wraps it), and channels_last weights with --channels_last (strides are part of the graph). (The input's
    layout is the same either way here: one channel.)"""
    from adni_diffusers import compile_probe

    seen = []

    def channels_last(t):
        return t.stride() == t.contiguous(memory_format=torch.channels_last).stride()

    def fake_compile(model, mode=None):
        conv = model.vq.encoder.conv_out
        conv.register_forward_hook(lambda m, args, out: seen.append(("conv dtype", out.dtype)))
        seen.append(("weights channels_last", channels_last(conv.weight)))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    small = {"batch_size": 1, "sample_shape": [1, 16, 16]}
    compile_probe.run_training_step(_spec("vqmodel", mixed_precision="bf16", channels_last=True, **small))
    assert seen == [("weights channels_last", True), ("conv dtype", torch.bfloat16)]
    seen.clear()
    compile_probe.run_training_step(_spec("vqmodel", **small))
    assert seen == [("weights channels_last", False), ("conv dtype", torch.float32)]


def test_the_childs_time_counts_from_its_start_not_from_the_question(monkeypatch):
    """The child works while the training process decodes the slices: its time counts from its start, so a
    training process that asks late waits only for what is left of it, not for all of it again."""
    import sys
    import time

    from adni_diffusers import compile_probe

    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [sys.executable, "-c",
                                                                            "import time; time.sleep(60)"])
    child = compile_probe.ChildStep(_spec(), timeout_s=1.5)
    time.sleep(1.0)  # the training process's own work
    asked = time.time()
    passed, why = child.result()
    assert not passed and why.startswith("no answer in")
    assert time.time() - asked < 1.0


def test_the_spec_carries_the_training_runs_own_choices():
    """The child repeats the training process's step: its batch size, sample shape, precision (what Accelerate
    chose), memory format, mode and device, as plain JSON; kernel flags a script does not have are off."""
    import numpy as np

    from adni_diffusers.compile_probe import make_spec

    args = SimpleNamespace(train_batch_size=np.int64(64), channels_last=True, compile_mode="reduce-overhead")
    accelerator = SimpleNamespace(mixed_precision="bf16", device=torch.device("cuda", 1))
    spec = make_spec("unet", {"sample_size": 32}, args, accelerator, torch.Size([4, 32, 32]))
    assert json.loads(json.dumps(spec)) == spec == {
        "stage": "unet", "config": {"sample_size": 32}, "batch_size": 64, "sample_shape": [4, 32, 32],
        "mixed_precision": "bf16", "channels_last": True, "compile_mode": "reduce-overhead", "allow_tf32": False,
        "cudnn_benchmark": False, "device": "cuda:1"}


def test_a_child_is_stopped_at_once_not_waited_for(monkeypatch):
    """The child leads its own process group, which is killed whole: stopping it (an error in the training process,
    a timeout) takes no longer than the kill, not until the child would have finished compiling."""
    import sys
    import time

    from adni_diffusers import compile_probe

    monkeypatch.setattr(compile_probe, "child_command", lambda spec_path: [sys.executable, "-c",
                                                                            "import time; time.sleep(30)"])
    child = compile_probe.ChildStep(_spec())
    stopping = time.time()
    child.cancel()
    assert time.time() - stopping < 10 and child._process.returncode is not None


_WATCHING_CHILD = """
import sys, time
from pathlib import Path
from adni_diffusers.compile_probe import _stop_with_parent
_stop_with_parent(Path(sys.argv[1]))
print("watching", flush=True)
time.sleep(120)
"""
_SHORT_LIVED_PARENT = """
import os, subprocess, sys
from adni_diffusers.compile_probe import PARENT_VARIABLE
env = {k: v for k, v in os.environ.items() if k != PARENT_VARIABLE}
if sys.argv[2] == "set":  # as ChildStep starts the compile check's child
    env[PARENT_VARIABLE] = str(os.getpid())
child = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]], stdout=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
child.stdout.readline()  # its watch has started: this process ends now, as a killed training process would
print(child.pid, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_an_orphaned_compile_check_stops_and_removes_only_its_own_spec_folder(tmp_path):
    """The training process killed (SIGKILL, a scheduler's SIGTERM): its compile-check child stops too, and removes
    the temporary folder ChildStep made for its spec, never a folder of the user's with a spec written by hand (the
    child run as `python -m adni_diffusers.compile_probe my_specs/spec.json`). Nothing tested either side."""
    import subprocess
    import sys

    cases = {"ours": (tmp_path / "adni_compile_probe_x1", "set"),  # ChildStep's folder: removed
             "by hand": (tmp_path / "my_specs", "unset"),  # a user's folder, no parent variable: kept
             "named like ours, by hand": (tmp_path / "adni_compile_probe_mine", "unset")}  # kept
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parents = {}
    for name, (folder, variable) in cases.items():
        folder.mkdir()
        (folder / "spec.json").write_text("{}")
        parents[name] = subprocess.Popen([sys.executable, "-c", _SHORT_LIVED_PARENT, str(folder / "spec.json"),
                                          variable, _WATCHING_CHILD], stdout=subprocess.PIPE, text=True, env=env)
    children = {name: int(p.communicate(timeout=120)[0].strip()) for name, p in parents.items()}
    try:
        wait_until(lambda: not any(_alive(pid) for pid in children.values()), seconds=30)
        assert not [name for name, pid in children.items() if _alive(pid)], "an orphaned child compiles on"
        assert not cases["ours"][0].exists()
        assert (cases["by hand"][0] / "spec.json").is_file()
        assert (cases["named like ours, by hand"][0] / "spec.json").is_file()
    finally:
        for pid in children.values():
            if _alive(pid):
                os.kill(pid, 9)
