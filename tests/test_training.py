"""adni_diffusers.training, the code both training scripts share, tested piece by piece on the CPU in seconds:
flags, the output folder, checkpoints, the LR schedule across process counts, EMA, and the run's bookkeeping.
Whole training runs are in test_train_unet.py / test_train_vqmodel.py; several real processes in
test_multiprocess.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_VQ_ARGS, another_process_holding, checkpoint_accelerator, reset_accelerate

from adni_diffusers import files, training
from adni_diffusers.data import load_slices


# ------------------------------------------------------------------------------------------ training.py: flags


def test_a_home_folder_given_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch):
    """`--output_dir=~/runs/vq` (a job script's habit): the shell leaves "~" after "=" as it is. The run wrote into
    a folder named "~" in the working folder and said `--vqmodel ~/runs/vq`, which a shell reads as the home folder."""
    from adni_diffusers import train_unet, train_vqmodel

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = train_vqmodel.parse_args(["--output_dir=~/runs/vq", "--train_data_dir=~/data", "--logging_dir", "tb"])
    assert (args.output_dir, args.train_data_dir) == (f"{tmp_path}/home/runs/vq", f"{tmp_path}/home/data")
    args = train_unet.parse_args(["--vqmodel=~/runs/vq", "--output_dir", "~/runs/ldm", "--latent_cache_dir=~/c"])
    assert (args.vqmodel, args.output_dir, args.latent_cache_dir) == (
        f"{tmp_path}/home/runs/vq", f"{tmp_path}/home/runs/ldm", f"{tmp_path}/home/c")
    assert not (tmp_path / "~").exists()


def test_the_commands_a_run_suggests_can_be_pasted_with_spaces_in_the_paths(tmp_path):
    """"tensorboard --logdir /home/me/ADNI runs/vq/logs" and "--vqmodel ADNI runs/vq": pasted into a shell, the
    path became two arguments."""
    import shlex

    from adni_diffusers import train_unet

    out = tmp_path / "ADNI runs" / "ldm réal"
    args = train_unet.parse_args(["--vqmodel", "vq", "--output_dir", str(out), "--report_to", "tensorboard"])
    (out / "samples").mkdir(parents=True)
    said = training.where_to_watch(args)
    assert shlex.split(said.split("tensorboard ")[1]) == ["--logdir", str((out / "logs").resolve())], said


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    """--resume_from_checkpoint takes 'latest' or a checkpoint-<step> folder: an existing folder of another name (a
    model, a typo'd parent) is refused when the flags are read, not fed to accelerate's load_state."""
    from adni_diffusers import train_vqmodel

    other = tmp_path / "weights"
    other.mkdir()
    with pytest.raises(training.TrainingError, match="expected 'latest' or an existing checkpoint-<step> folder"):
        train_vqmodel.parse_args(["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(other)])
    good = tmp_path / "checkpoint-3"
    good.mkdir()
    args = train_vqmodel.parse_args(["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(good)])
    assert args.resume_from_checkpoint == str(good)


def test_resume_from_a_checkpoints_name_finds_it_in_the_output_dir(tmp_path, monkeypatch):
    """`--resume_from_checkpoint checkpoint-20`, as diffusers' training examples take it (a name in --output_dir),
    was refused with "expected 'latest' or an existing checkpoint-<step> folder" beside the output_dir's
    checkpoint-20: the name was read from the current folder alone. One there still comes first."""
    from adni_diffusers import train_vqmodel

    out = tmp_path / "o"
    (out / "checkpoint-20").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = train_vqmodel.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-20"])
    assert Path(args.resume_from_checkpoint) == out / "checkpoint-20"
    (tmp_path / "checkpoint-20").mkdir()
    args = train_vqmodel.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-20"])
    assert args.resume_from_checkpoint == "checkpoint-20"
    with pytest.raises(training.TrainingError, match="expected 'latest' or an existing checkpoint-<step> folder"):
        train_vqmodel.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-30"])


# ------------------------------------------------------------------------------------------ training.py: output folder


def test_a_start_removes_saves_cut_short_but_keeps_finished_checkpoints(tmp_path):
    """A crash during a save leaves checkpoint-N.tmp (or checkpoint-N.old.tmp): the next start removes them (they
    can be gigabytes) and keeps every finished checkpoint."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    for name in ("checkpoint-4", "checkpoint-6.tmp", "checkpoint-4.old.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(b"x")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint="latest", overwrite_output_dir=False,
                           logging_dir="logs")
    (out / "samples").mkdir()
    (out / "samples" / "reconstructions-000002.png").write_bytes(b"png")
    (out / "samples" / "reconstructions-000004.png.tmp").write_bytes(b"")  # a grid's write cut short
    training.prepare_output_dir(args, Accelerator(cpu=True), "vqvae", project="vqmodel")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "samples"]
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert [p.name for p in (out / "samples").iterdir()] == ["reconstructions-000002.png"]


def test_a_checkpoint_without_its_lr_schedule_is_refused_naming_the_file(tmp_path):
    """Every file a resume loads is checked before any work: a checkpoint missing scheduler.bin is named as such
    (accelerate would fail later, or resume with a fresh learning-rate schedule)."""
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    for name in ("training_state.json", "model.safetensors", "optimizer.bin"):
        (path / name).write_bytes(b"{}")
    with pytest.raises(training.TrainingError, match=r"not a complete checkpoint of this package \(no scheduler.bin\)"):
        training.check_checkpoint_files(path, SimpleNamespace(scaler=None))
    (path / "scheduler.bin").write_bytes(b"x")
    training.check_checkpoint_files(path, SimpleNamespace(scaler=None))


# ------------------------------------------------------------------------------------------ training.py: data


def _data_args(root, batch: int) -> SimpleNamespace:
    return SimpleNamespace(train_data_dir=str(root), split="all", val_fraction=0.1, seed=0, split_seed=None,
                           preprocess="pad", patient_ids="subject", train_batch_size=batch,
                           gradient_accumulation_steps=1)


_ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1, main_process_first=contextlib.nullcontext,
                               local_main_process_first=contextlib.nullcontext)


def test_exactly_one_batch_of_training_images_is_enough(demo_root):
    """The refusal is for fewer images than one batch: a set of exactly --train_batch_size images trains."""
    n = len(load_slices(demo_root, split="all").train)
    data, _ = training.load_training_data(_data_args(demo_root, n), _ONE_PROCESS)
    assert len(data.train) == n
    with pytest.raises(training.TrainingError, match="fewer than one batch"):
        training.load_training_data(_data_args(demo_root, n + 1), _ONE_PROCESS)


def test_the_processes_wait_for_the_main_one_to_index_not_to_decode(demo_root, monkeypatch):
    """The main process builds datasets' file index first (the others read its cache); decoding has no cache, so
    every process decodes at once. It sat in the ordered section too: the others waited through the main
    process's whole decode (22 s for 30,000 slices on an H100), then on several nodes each node's first's."""
    from adni_diffusers import data as data_module

    events = []

    @contextlib.contextmanager
    def ordered(name):
        events.append(f"enter {name}")
        yield
        events.append(f"leave {name}")

    accelerator = SimpleNamespace(num_processes=1, is_main_process=True,
                                  main_process_first=lambda: ordered("main first"),
                                  local_main_process_first=lambda: ordered("node first"))
    real_index, real_decode = data_module._index_with_datasets, data_module.decode_all
    monkeypatch.setattr(data_module, "_index_with_datasets", lambda *a: events.append("index") or real_index(*a))
    monkeypatch.setattr(data_module, "decode_all",
                        lambda *a, **kw: events.append("decode") or real_decode(*a, **kw))
    training.load_training_data(_data_args(demo_root, 2), accelerator)
    assert events == ["enter main first", "enter node first", "index", "leave node first", "leave main first",
                      "decode"]


# ------------------------------------------------------------------------------------------ training.py: LR schedule


def test_lr_warmup_counts_optimizer_steps_whatever_the_number_of_processes():
    """A prepared schedule steps once per process per optimizer step: on 2 processes --lr_warmup_steps 2 must still
    reach the peak after 2 optimizer steps (not after 1) and the linear decay end at 0 at the last step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=2)
    scheduler = training.make_lr_scheduler(optimizer, args, SimpleNamespace(num_processes=2), max_train_steps=4)
    rates = []
    for _ in range(4):  # optimizer steps
        optimizer.step()
        for _ in range(2):  # one scheduler step per process
            scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.5, 1.0, 0.5, 0.0])


def test_a_resume_on_fewer_processes_moves_the_lr_schedule_to_the_step_and_rescales_sqrt():
    """A checkpoint of step 2 written by 4 processes, resumed on 1: the schedule stands at step 2 of a 1-process run
    (not at 2 x 4 = 8, its end) and --scale_lr sqrt scales the rate by sqrt(1/4)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=0, scale_lr="sqrt")
    scheduler = training.make_lr_scheduler(optimizer, args, SimpleNamespace(num_processes=1), max_train_steps=8)
    training.reposition_lr_schedule(scheduler, args, step=2, then=4, now=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 6 / 8)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 5 / 8)


# ------------------------------------------------------------------------------------------ training.py: EMA


class _TinyModel(torch.nn.Linear):
    config = {}  # what make_ema hands to EMAModel (a diffusers model's config)


@pytest.mark.parametrize("inv_gamma, power, max_decay, steps", [
    (2.0, 0.5, 0.9999, 6),  # the warm-up: (1 + 6/2) ** -0.5 = 0.5 of a jump after 6 steps
    (1.0, 0.75, 0.5, 100),  # the cap: the warm-up alone would be at 1 - (1 + 100) ** -0.75 = 0.97 by then
], ids=["warm-up", "max-decay"])
def test_ema_decay_follows_the_inv_gamma_power_and_max_decay_flags(inv_gamma, power, max_decay, steps):
    """--use_ema: the decay warms up as 1 - (1 + t / --ema_inv_gamma) ** -(--ema_power) (diffusers' warm-up) and
    stops at --ema_max_decay; in both cases here a jump of the weights moves the average by half of it. (The other
    EMA tests use the default max decay 0.9999, which the warm-up does not reach in their few steps.)"""
    torch.manual_seed(0)
    model = _TinyModel(2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    args = SimpleNamespace(use_ema=True, ema_max_decay=max_decay, ema_inv_gamma=inv_gamma, ema_power=power)
    ema = training.make_ema(model, args, "cpu")
    for _ in range(steps):
        ema.ema.step(model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema.ema.step(model.parameters())
    for shadow in ema.ema.shadow_params:
        torch.testing.assert_close(shadow, torch.full_like(shadow, 0.5))


def test_resuming_without_ema_weights_under_use_ema_says_so(tmp_path):
    """A checkpoint written without --use_ema, resumed with it: a TrainingError naming the checkpoint and the flag,
    not a KeyError from inside the EMA restore."""
    try:
        acc = checkpoint_accelerator()
        path = training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
        run = object.__new__(training.TrainingRun)
        run.args = SimpleNamespace(resume_from_checkpoint=str(path), output_dir=str(tmp_path), lr_scheduler="constant")
        run.accelerator, run.record, run.lr_scheduler, run.max_train_steps = acc, {}, None, 4
        run.ema = training.EMAState(SimpleNamespace(shadow_params=[torch.zeros(2)], optimization_step=0))
        with pytest.raises(training.TrainingError, match="holds no EMA weights but --use_ema is set"):
            run.resume()
    finally:
        reset_accelerate()


class _NotTensors:
    """What a crafted checkpoint file holds instead of tensors: unpickling it would call its __reduce__."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get("PWNED_MARKER", "/nonexistent/marker")),))


def test_a_checkpoint_file_holding_more_than_tensors_is_refused_in_words(tmp_path, monkeypatch):
    """A shared or downloaded checkpoint whose optimizer.bin runs code when unpickled: torch refuses it, and the
    run ended in a traceback whose last line advised loading it with weights_only=False. It is a one-line
    TrainingError naming the checkpoint, and nothing of the file runs."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    try:
        acc = checkpoint_accelerator(optimizer=True)
        path = training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
        torch.save(_NotTensors(), path / "optimizer.bin")
        with pytest.raises(training.TrainingError) as refused:
            training.load_checkpoint(acc, path)
    finally:
        reset_accelerate()
    message = str(refused.value)
    assert message.startswith(f"--resume_from_checkpoint {path}: a file in it holds more than tensors and numbers")
    assert "not a checkpoint this package wrote" in message and "weights_only=False" not in message
    assert "Unsupported global" in message and "add_safe_globals" not in message, message  # what torch refused
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused_in_words(tmp_path):
    """A checkpoint from before 2026-12-02 has no run record to compare the model config with, so a resume with
    another --preset (or without --conditional) reached accelerate's load_state: a traceback of one 'size
    mismatch' line per tensor. It is a one-line TrainingError naming the checkpoint and the flags to give."""
    try:
        acc = checkpoint_accelerator(optimizer=True)
        path = training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
        acc = checkpoint_accelerator(out_features=3, optimizer=True)  # a wider model from these flags
        with pytest.raises(training.TrainingError) as refused:
            training.load_checkpoint(acc, path)
    finally:
        reset_accelerate()
    message = str(refused.value)
    assert message.startswith(f"--resume_from_checkpoint {path}: its weights do not fit the model"), message
    assert "size mismatch for weight" in message and "--preset" in message and "\n" not in message, message


def test_a_checkpoints_unreadable_random_states_are_warned_about(tmp_path, caplog):
    """accelerate's load_state went on without a random_states_0.pkl it could not read, saying so at INFO (hidden
    at the run's log level): the resume was not the exact continuation the tests promise, without a word."""
    try:
        acc = checkpoint_accelerator()
        path = training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
        with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
            training.load_checkpoint(acc, path)
            assert "could not be read" not in caplog.text  # a whole checkpoint: nothing said
            (path / "random_states_0.pkl").write_bytes(b"not a pickle")
            training.load_checkpoint(acc, path)
    finally:
        reset_accelerate()
    assert f"{path / 'random_states_0.pkl'} could not be read (damaged?): the run goes on from the checkpoint's " \
        "weights and optimizer, but its random numbers" in caplog.text


def test_a_fresh_start_clears_the_trace_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    """--trace_batches appends a row per step: a run that died before its first checkpoint left rows for steps 1-3,
    and a fresh start (no --overwrite_output_dir: nothing was saved) appended its own, so steps 1-3 read as trained
    twice. It starts a new trace, as it starts a new loss history."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    for path in (out / "trace" / "rank-0.jsonl", out / training.HISTORY_FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint="latest", overwrite_output_dir=False,
                           logging_dir="logs")
    training.prepare_output_dir(args, Accelerator(cpu=True), "vqvae", project="vqmodel")
    training.clear_earlier_run(args, Accelerator(cpu=True), "vqvae", project="vqmodel")
    assert not (out / training.HISTORY_FILE).exists() and not (out / "trace").exists()


# ------------------------------------------------------------------------------------------ training.py: checkpoints


def test_a_checkpoint_abandoned_again_gets_a_new_name(tmp_path):
    """Going back to checkpoint-2 a third time: checkpoint-4.abandoned and checkpoint-4.abandoned-2 exist already, so
    the new checkpoint-4 becomes checkpoint-4.abandoned-3 and the earlier ones are kept as they were."""
    from accelerate import Accelerator

    names = ("checkpoint-2", "checkpoint-4", "checkpoint-4.abandoned", "checkpoint-4.abandoned-2")
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "origin.txt").write_text(name)
    run = object.__new__(training.TrainingRun)
    run.output_dir, run.accelerator = tmp_path, Accelerator(cpu=True)
    run._set_aside_newer_checkpoints(2)
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-4.abandoned-3" / "origin.txt").read_text() == "checkpoint-4"
    for name in names[2:]:
        assert (tmp_path / name / "origin.txt").read_text() == name


# ------------------------------------------------------------------------------------------ training.py: the run


def test_shared_step_seeds_are_the_same_on_every_process():
    """`step_generator(shared=True)` is for decisions every process must agree on: its seed cannot depend on the
    process, while each process's own stream must differ."""
    run = object.__new__(training.TrainingRun)
    run.args, run.global_step, run._micro = SimpleNamespace(seed=5), 3, 1
    shared, own = set(), set()
    for rank in (0, 1, 3):
        run.accelerator = SimpleNamespace(process_index=rank)
        shared.add(run.step_seed(shared=True))
        own.add(run.step_seed())
    assert len(shared) == 1 and len(own) == 3


def test_images_per_second_counts_only_the_steps_trained_in_this_run():
    """A run resumed at step 6 that trains to step 10 in 2 s trained 4 steps: 4 x batch 4 x accumulation 2 x 2
    processes = 64 images, 32 per second (the steps before the resume are not this run's)."""
    run = object.__new__(training.TrainingRun)
    run.global_step, run.start_step = 10, 6
    run._images_trained = 64  # end_step's count (an epoch's short last step counts its own micro-batches alone)
    assert run.images_per_second(2.0) == 32.0
    run.start_step = 10  # resumed at its last step to finish the save: no rate (the card said "0 images/s")
    assert run.images_per_second(2.0) is None


def test_a_history_line_cut_short_by_a_crash_does_not_stop_the_resume(tmp_path, caplog):
    """logs/history.jsonl is appended a line at a time: a crash or a full disk mid-line left half a row (or NUL
    bytes), and every later resume failed in json.loads, its checkpoints intact."""
    run = object.__new__(training.TrainingRun)
    run.output_dir = tmp_path
    run.accelerator = SimpleNamespace(process_index=0, is_main_process=True)
    history = tmp_path / training.HISTORY_FILE
    history.parent.mkdir(parents=True)
    rows = [{"step": k, "loss": 1.0 / k} for k in (1, 2, 3)]
    history.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"step": 4, "lo' + b"\x00" * 8)
    with caplog.at_level("WARNING"):
        run._truncate_history(2)
    assert run.history() == rows[:2] and "skipped 1 line(s)" in caplog.text
    history.write_bytes(history.read_bytes() + b"\x00" * 16 + b"\n" + b'{"step": 3, "loss"')
    assert run.history() == rows[:2]  # the plot and the card read it too


def test_save_run_info_never_writes_a_hub_token(tmp_path):
    """training_args.json is pushed with the model: --hub_token (any flag with "token" in its name) is left out."""
    args = SimpleNamespace(learning_rate=1e-4, hub_token="hf_SecretValue123", hub_model_id="user/model")
    data = SimpleNamespace(summary=lambda: {"images": 1}, split="given")
    training.save_run_info(tmp_path, args, data, "user")
    text = (tmp_path / "training_args.json").read_text()
    assert "hf_SecretValue123" not in text and "hub_token" not in text
    assert json.loads(text)["hub_model_id"] == "user/model"


def test_a_resumed_run_records_where_its_earlier_sessions_differed(tmp_path):
    """training_args.json is rewritten by every session: a run trained in bf16 on 4 processes and resumed in
    float32 on one said "no" and 1 process for all its steps. Each session now keeps the earlier ones' differing
    settings; a resume from an earlier checkpoint drops the sessions whose steps it replaces, and a fresh run
    carries nothing over."""
    data = SimpleNamespace(summary=lambda: {"images": 1}, split="given")

    def session(start, precision, processes, max_steps, resume=None):
        args = SimpleNamespace(learning_rate=1e-4, mixed_precision=precision, max_train_steps=max_steps,
                               resume_from_checkpoint=resume, train_batch_size=2, gradient_accumulation_steps=1)
        accelerator = SimpleNamespace(mixed_precision=precision, device=torch.device("cpu"), num_processes=processes)
        training.save_run_info(tmp_path, args, data, "user", accelerator=accelerator, start_step=start)
        return json.loads((tmp_path / "training_args.json").read_text())

    # the global batch moves with the process count (2 a process)
    first = {"mixed_precision": "bf16", "mixed_precision_used": "bf16", "num_processes": 4, "global_batch_size": 8,
             "max_train_steps": 100}
    assert "earlier_sessions" not in session(0, "bf16", 4, 100)
    assert session(50, "no", 1, 200, "latest")["earlier_sessions"] == [{"started_at_step": 0, "changed": first}]
    record = session(120, "no", 2, 200, "latest")
    assert record["started_at_step"] == 120 and record["earlier_sessions"] == [
        {"started_at_step": 0, "changed": first},
        {"started_at_step": 50, "changed": {"num_processes": 1, "global_batch_size": 2}}]
    # back to the checkpoint of step 50: the sessions from 50 on are replaced, the first one stays
    assert session(50, "no", 2, 200, "checkpoint-50")["earlier_sessions"] == [
        {"started_at_step": 0, "changed": first}]
    assert "earlier_sessions" not in session(0, "no", 1, 10)  # a new run in the same folder
    # fp16 on the CPU trained in float32, as the resumed --mixed_precision no does: what it trained in is kept
    # beside the flag all the same (the card said "fp16" alone, or borrowed the last session's precision)
    session(0, "fp16", 1, 10)
    assert session(5, "no", 1, 10, "latest")["earlier_sessions"] == [
        {"started_at_step": 0, "changed": {"mixed_precision": "fp16", "mixed_precision_used": "no"}}]


def test_the_run_records_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """training_data.json and training_args.json are rewritten at every (resumed) start and read back by the next
    resume, evaluate and the card: a kill or a full disk mid-write left JSON they refused. The earlier records stay
    whole now, and no .tmp is left beside them."""
    args = SimpleNamespace(learning_rate=1e-4)
    data = SimpleNamespace(summary=lambda: {"images": 1}, split="given")
    training.save_run_info(tmp_path, args, data, "user")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(before) == ["training_args.json", "training_data.json"]
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        training.save_run_info(tmp_path, SimpleNamespace(learning_rate=2e-4), data, "user")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_peer_lost_after_the_run_finished_does_not_send_the_user_back_to_a_checkpoint(monkeypatch, capsys,
                                                                                          tmp_path):
    """A process that waited past --ddp_timeout while the main one finished its final evaluation ends, and the main
    process, its model saved and its card written, then meets the gone peer at the last barrier: it said to go on
    from the last checkpoint, older than the finished model (a resume would train again from there)."""
    def finished_then_lost_peer(args):
        training.push_if_asked(None, args)  # the clean end: final save and card done, no --push_to_hub
        raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:29500.")

    (tmp_path / "checkpoint-4").mkdir()
    monkeypatch.setenv("RANK", "0")
    args = SimpleNamespace(output_dir=str(tmp_path), push_to_hub=False)
    assert training.run_cli("train_unet.py", lambda argv: args, finished_then_lost_peer) == 2
    err = capsys.readouterr().err
    assert f"this run had finished: its model in {tmp_path} is complete" in err and "checkpoint-4" not in err, err
    assert not training.FINISHED_OUTPUT_DIRS  # the next run in this process starts unfinished
    assert training.run_cli("train_unet.py", lambda argv: args, lambda a: (_ for _ in ()).throw(
        RuntimeError("Connection closed by peer"))) == 2
    assert "go on from it with --resume_from_checkpoint latest" in capsys.readouterr().err


def test_a_lost_peer_is_one_line_on_every_process(monkeypatch, capsys, tmp_path):
    """The one-line "another process ended" replaces the traceback on every process. On the main process (RANK 0)
    the connection error was raised as it is: 25 lines of gloo traceback where another process was killed (the OOM
    killer, kill -9) and printed nothing, and not a word of the checkpoint to go on from. Now one line, with
    gloo's words and where to go on."""
    def lost_peer(args):
        raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:29500. This is typically caused by "
                           "a remote worker crashing.")

    (tmp_path / "checkpoint-4").mkdir()
    monkeypatch.setenv("RANK", "0")
    assert training.run_cli("train_vqmodel.py", lambda argv: SimpleNamespace(output_dir=tmp_path), lost_peer) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_vqmodel.py: stopped: another process ended (its error, if any, is above; the "
                          "launcher's summary below gives its exit code): [pair.cc:561] Connection closed by peer "
                          f"[127.0.0.1]:29500; the last checkpoint is {tmp_path / 'checkpoint-4'}: go on from it "
                          "with --resume_from_checkpoint latest"), err
    assert "typically" not in err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training.run_cli("train_vqmodel.py", lambda argv: SimpleNamespace(), lost_peer) == 2
    assert "process 1 stopped: another process ended" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # any other RuntimeError is raised as it is
    with pytest.raises(RuntimeError, match="CUDA error"):
        training.run_cli("train_vqmodel.py", lambda argv: SimpleNamespace(),
                         lambda args: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access")))


def test_an_error_every_process_meets_is_left_to_the_main_process(monkeypatch, capsys):
    """Under a launcher every process parsed the same flags and read the same folders: each printed the same error
    (a bad flag, a bad image, a NaN). The others now stay quiet once the main process has ended (torchrun's SIGTERM
    says so), and say it themselves if it does not end; an error of one process alone is said where it happens."""
    import signal

    def bad_flag(argv):
        raise training.TrainingError("--val_fraction must be between 0 and 1, got 2.0")

    def own(args):
        error = training.TrainingError("--output_dir out: cannot write there (Read-only file system)")
        error.every_process = False
        raise error

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    waited = []
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: waited.append(s) or True)
    assert training.run_cli("train_vqmodel.py", bad_flag, lambda args: None) == 2
    assert capsys.readouterr().err == "" and waited == [training.MAIN_PROCESS_ERROR_WAIT_S]
    assert training.run_cli("train_vqmodel.py", lambda argv: SimpleNamespace(), own) == 2
    assert "cannot write there" in capsys.readouterr().err
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: False)  # the main process goes on
    assert training.run_cli("train_vqmodel.py", bad_flag, lambda args: None) == 2
    assert "train_vqmodel.py: error: --val_fraction" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert training.run_cli("train_vqmodel.py", bad_flag, lambda args: None) == 2
    assert "train_vqmodel.py: error: --val_fraction" in capsys.readouterr().err
    # the wait itself: a SIGTERM ends it, the handler before it is back afterwards
    monkeypatch.undo()
    before = signal.getsignal(signal.SIGTERM)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    previous_alarm = signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    try:
        assert training._main_process_ends_within(10.0) is True
    finally:
        signal.signal(signal.SIGALRM, previous_alarm)
    assert signal.getsignal(signal.SIGTERM) == before
    assert training._main_process_ends_within(0.1) is False


def test_argparse_error_on_another_process_waits_for_the_main_one(monkeypatch, capsys):
    """argparse's usage error on a process other than the main one: it left at once, quietly, and torchrun (polling
    every 0.1 s) stopped the main process before it had printed the error when the main process was a moment
    behind (a busy node, a cold file system): the run ended with exit statuses and not a word. It now waits for the
    main process to end, as for a TrainingError, and prints the error itself if that does not come."""
    import argparse

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = argparse.ArgumentParser(prog="train_vqmodel.py")
    parser.add_argument("--output_dir", required=True)
    waited = []
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: waited.append(s) or True)
    with pytest.raises(SystemExit) as e:
        training.run_cli("train_vqmodel.py", parser.parse_args, lambda args: None, argv=[])
    assert e.value.code == 2 and waited == [training.MAIN_PROCESS_ERROR_WAIT_S]
    assert capsys.readouterr().err == ""  # the main process says it
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: False)  # the main process goes on
    with pytest.raises(SystemExit) as e:
        training.run_cli("train_vqmodel.py", parser.parse_args, lambda args: None, argv=[])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("usage: train_vqmodel.py") == 1 and "error: the following arguments are required" in err
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: pytest.fail("--help need not wait"))
    with pytest.raises(SystemExit) as e:
        training.run_cli("train_vqmodel.py", parser.parse_args, lambda args: None, argv=["--help"])
    assert e.value.code == 0


def test_rank_set_without_a_launcher_is_the_only_process(monkeypatch, capsys):
    """RANK left in the environment (a job script that exported it for torchrun, a Kubeflow pod) but no launcher:
    `python train_vqmodel.py` is one process, Accelerate's main one, and says its errors itself. It took itself for
    process 1 of a group: argparse's usage and error went nowhere (exit status 2, not a word), and a TrainingError
    came only after waiting 30 s for a main process that does not exist."""
    import argparse

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(training, "_main_process_ends_within", lambda s: pytest.fail("waited for a main process"))
    parser = argparse.ArgumentParser(prog="train_vqmodel.py")
    parser.add_argument("--output_dir", required=True)
    with pytest.raises(SystemExit) as e:
        training.run_cli("train_vqmodel.py", parser.parse_args, lambda args: None, argv=[])
    assert e.value.code == 2
    assert "train_vqmodel.py: error: the following arguments are required: --output_dir" in capsys.readouterr().err

    def bad_flag(argv):
        raise training.TrainingError("--val_fraction must be between 0 and 1, got 2.0")

    assert training.run_cli("train_vqmodel.py", bad_flag, lambda args: None) == 2
    assert "train_vqmodel.py: error: --val_fraction" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's one process
    assert training.run_cli("train_vqmodel.py", bad_flag, lambda args: None) == 2
    assert "train_vqmodel.py: error: --val_fraction" in capsys.readouterr().err


def _run_for_end_step(model, ema=None, max_grad_norm=1.0):
    """A TrainingRun with only what end_step and clip_gradients read (no data, no checkpoints)."""
    from accelerate import Accelerator

    run = object.__new__(training.TrainingRun)
    run.accelerator, run.model, run.ema = Accelerator(cpu=True), model, ema
    run.progress = SimpleNamespace(set_postfix=lambda *a, **k: None, update=lambda n: None)
    run.args = SimpleNamespace(logging_steps=1000, checkpointing_steps=1000, trace_batches=False,
                               max_grad_norm=max_grad_norm, train_batch_size=1)
    run.global_step, run.start_step, run.max_train_steps = 5, 0, 1000
    run._pending, run._micro_logs, run._batches_since_step = [], [], 0
    return run


def test_each_optimizer_step_moves_the_ema_toward_the_weights():
    """--use_ema saves the average, not the weights: end_step must update it at every optimizer step (with none,
    the saved model would be the untrained start, and every check of "saved == EMA" would still pass)."""
    model = _TinyModel(2, 2)
    args = SimpleNamespace(use_ema=True, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    ema = training.make_ema(model, args, "cpu")
    run = _run_for_end_step(model, ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimizer step
    run.end_step({"loss": torch.tensor(0.5)})  # diffusers' warm-up: the first step takes the weights whole
    for shadow, p in zip(ema.ema.shadow_params, model.parameters()):
        torch.testing.assert_close(shadow, p.detach())
    start = [p.detach().clone() for p in ema.ema.shadow_params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    run.end_step({"loss": torch.tensor(0.5)})
    decay = 1 - (1 + 1 / 1.0) ** -0.75  # the second step: 1 - (1 + 1 / inv_gamma) ** -power
    assert ema.ema.optimization_step == 2 and run.global_step == 7
    for before, shadow, p in zip(start, ema.ema.shadow_params, model.parameters()):
        torch.testing.assert_close(shadow, decay * before + (1 - decay) * p.detach())


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_is_logged():
    """--max_grad_norm: the step's gradients are scaled to that global norm (a spike would otherwise go into the
    weights whole); the logged grad_norm is the norm before clipping."""
    model = _TinyModel(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norm_before = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    for p in model.parameters():
        p.grad.mul_(10 / norm_before)  # global norm 10
    run = _run_for_end_step(model, max_grad_norm=1.0)
    logged = run.clip_gradients(model.parameters())
    assert logged["grad_norm"].item() == pytest.approx(10.0, rel=1e-5)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(1.0, rel=1e-5)


def test_save_into_swaps_in_whole_parts_and_a_save_cut_short_leaves_the_earlier_model(tmp_path):
    """The final pipeline was saved in place: a full disk halfway left half-written weights beside the earlier
    model's configs, a folder that no longer loaded (its checkpoint the only copy). Now every part is the old
    one or the new one; other files (checkpoints) stay; a linked component is replaced, its target untouched."""
    out, elsewhere = tmp_path / "out", tmp_path / "first_stage"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "weights").write_text("old")
    (out / "model_index.json").write_text("old")
    (out / "checkpoint-2").mkdir()
    elsewhere.mkdir()
    (elsewhere / "weights").write_text("first stage")
    (out / "vqvae").symlink_to(elsewhere, target_is_directory=True)

    def save(folder, fail=False):
        for part in ("vqvae", "unet"):
            (folder / part).mkdir(parents=True)
            (folder / part / "weights").write_text("new"[: 1 if fail else 3])
            if fail and part == "unet":
                raise OSError(28, "No space left on device")
        (folder / "model_index.json").write_text("new")

    with pytest.raises(OSError):
        training.save_into(out, lambda folder: save(folder, fail=True), last="model_index.json")
    assert (out / "unet" / "weights").read_text() == "old" and (out / "model_index.json").read_text() == "old"
    training.save_into(out, save, last="model_index.json")
    assert {p.name for p in out.iterdir()} == {"unet", "vqvae", "model_index.json", "checkpoint-2"}
    assert (out / "unet" / "weights").read_text() == "new" and (out / "model_index.json").read_text() == "new"
    assert not (out / "vqvae").is_symlink() and (out / "vqvae" / "weights").read_text() == "new"
    assert (elsewhere / "weights").read_text() == "first stage"


def test_forget_earlier_results_removes_a_generated_card_and_keeps_the_users_own(tmp_path):
    from adni_diffusers.model_card import CARD_MARKER

    (tmp_path / "samples.png").write_bytes(b"png")
    (tmp_path / "README.md").write_text(f"{CARD_MARKER} -->\n# an earlier model\n")
    training.forget_earlier_results(tmp_path, "samples.png", "train_metrics.json")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "README.md").write_text("# my own card\n")
    training.forget_earlier_results(tmp_path, "samples.png")
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_an_os_error_after_training_says_which_checkpoint_holds_it(tmp_path, capsys):
    """A full disk in the final save gave a bare traceback: now a line before it names the last checkpoint and how
    to go on (the error itself is not hidden)."""
    (tmp_path / "checkpoint-6").mkdir()

    def main(args):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        training.run_cli("train_unet.py", lambda argv: SimpleNamespace(output_dir=str(tmp_path)), main, [])
    err = capsys.readouterr().err
    assert (f"train_unet.py: stopped by the error below; the last checkpoint is {tmp_path / 'checkpoint-6'}: go on "
            "from it with --resume_from_checkpoint latest once it is fixed") in err


def test_checkpoint_files_are_synced_through_a_handle_windows_lets_fsync(tmp_path, monkeypatch):
    """Windows' fsync (FlushFileBuffers) raises EBADF on a read-only handle: every checkpoint save, and so every
    training run, failed there. Simulated: an fsync that refuses read-only descriptors, as Windows does."""
    import fcntl
    import os

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"weights")
    synced = []

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        synced.append(fd)

    with monkeypatch.context() as m:  # os.name back before pytest reports (a "nt" there is an INTERNALERROR)
        m.setattr(os, "name", "nt")
        m.setattr(os, "fsync", windows_fsync)
        files.fsync_tree(tmp_path)
    assert len(synced) == 1 and (tmp_path / "sub" / "model.safetensors").read_bytes() == b"weights"


def test_the_steady_rate_is_the_median_between_logs():
    """train_images_per_second_this_run counts the first step's compilation, checkpoints and sample grids (2,612
    against 4,490 between logs on an H200, 2026-12-04); the steady rate is the median over the logging intervals."""
    from adni_diffusers.training import median_interval_rate

    steady = [(10 * i, 0.57 * i) for i in range(1, 6)]  # 57 ms a step, batch 256
    with_checkpoint = [*steady, (60, 0.57 * 5 + 2.77), (70, 0.57 * 5 + 2.77 + 0.57)]  # one slow interval
    assert median_interval_rate(steady, 256) == round(10 * 256 / 0.57, 2)
    assert median_interval_rate(with_checkpoint, 256) == pytest.approx(10 * 256 / 0.57, abs=0.01)
    assert median_interval_rate([(10, 1.0), (15, 1.5)], 4) == 40.0  # uneven intervals (a checkpoint's flush)
    assert median_interval_rate([(10, 1.0), (20, 1.5), (30, 3.0)], 1) == pytest.approx((20 + 10 / 1.5) / 2, abs=0.01)
    assert median_interval_rate([(10, 1.0)], 256) is None and median_interval_rate([], 256) is None
    assert median_interval_rate([(10, 1.0), (10, 2.0)], 256) is None  # a second log at the same step


def test_a_stop_signal_again_while_finishing_ends_the_run_unless_it_is_the_same_request():
    """After the last step a stop signal lets the final save finish; a second one ends the run (the handler from
    before training runs), except the same signal within REPEATED_SIGNAL_S: torchrun's agent forwards the SIGTERM
    SLURM sent every process, so each worker gets it twice, and the second copy cut the final save short."""
    import signal
    import time
    from types import SimpleNamespace

    from adni_diffusers.training import REPEATED_SIGNAL_S, TrainingRun

    handled = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
    try:
        previous = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}
        run = SimpleNamespace(_signalled=signal.SIGUSR1, _signalled_at=time.monotonic(), _previous_handlers=previous)
        run._restore_signal_handlers = lambda: TrainingRun._restore_signal_handlers(run)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the final phase's own handler stands here
        TrainingRun._stop_while_finishing(run, signal.SIGUSR1, None)  # the forwarded copy: ignored
        assert handled == [] and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        run._signalled_at -= REPEATED_SIGNAL_S + 1  # the user's second request: the old handler, and it runs
        TrainingRun._stop_while_finishing(run, signal.SIGUSR1, None)
        assert handled == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is previous[signal.SIGUSR1]
        run._signalled_at = time.monotonic()  # another stop signal, even at once, is another request
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        run._signalled = signal.SIGTERM
        TrainingRun._stop_while_finishing(run, signal.SIGUSR1, None)
        assert handled == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, before)


# ------------------------------------------------------------------------------------------ eighth mutation audit


def test_gradients_are_clipped_to_the_given_max_grad_norm():
    """--max_grad_norm 0.25, not the default 1.0 (the other clipping test uses 1.0)."""
    model = _TinyModel(2, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    run = _run_for_end_step(model, max_grad_norm=0.25)
    run.clip_gradients(model.parameters())
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(0.25, rel=1e-5)


def test_the_optimizer_takes_the_adam_flags():
    """--adam_beta1/2, --adam_weight_decay and --adam_epsilon reach AdamW (its defaults differ: weight decay 0.01)."""
    args = SimpleNamespace(learning_rate=3e-4, scale_lr=False, gradient_accumulation_steps=1, train_batch_size=8,
                           adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.0, adam_epsilon=1e-6)
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), is_main_process=True)
    optimizer = training.make_optimizer([torch.nn.Parameter(torch.zeros(1))], args, accelerator, default_batch=8)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.8, 0.95), 0.0, 1e-6)


def test_a_resume_on_more_processes_rescales_a_linear_scale_lr():
    """--scale_lr linear, a checkpoint of 2 processes resumed on 4: the global batch doubled, so the rate doubles
    (the sqrt rule's test resumes on fewer processes)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    args = SimpleNamespace(lr_scheduler="constant", lr_warmup_steps=0, scale_lr="linear")
    scheduler = training.make_lr_scheduler(optimizer, args, SimpleNamespace(num_processes=4), max_train_steps=8)
    training.reposition_lr_schedule(scheduler, args, step=3, then=2, now=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0)


def test_an_epoch_based_run_counts_optimizer_steps_not_micro_batches():
    """--num_epochs without --max_train_steps: 3 epochs of 5 batches in steps of 2 micro-batches are 3 x 3 optimizer
    steps (the last of each epoch short), the length of the run and of its LR schedule, not 3 x 5."""
    args = SimpleNamespace(max_train_steps=None, num_epochs=3, gradient_accumulation_steps=2)
    assert training.total_train_steps(args, list(range(5))) == 9


def test_a_resume_mid_epoch_weights_the_remaining_micro_batches_as_an_uninterrupted_run(tmp_path):
    """Epochs of 5 batches in steps of 2 + 2 + 1 micro-batches: only the last, one-batch step is weighted up (x2).
    Resumed after step 1, the loader holds only the 3 batches left; weighing them by that loader's length made the
    full step 2 look short (x2 as well). The weights must be the uninterrupted run's last three."""
    import itertools

    from accelerate import Accelerator

    reset_accelerate()
    try:
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        sampler = training.EpochShuffleSampler(5, seed=0)
        loader = acc.prepare(torch.utils.data.DataLoader(torch.arange(5.0), batch_size=1, sampler=sampler))
        args = SimpleNamespace(seed=0, train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=6,
                               trace_batches=False, output_dir=str(tmp_path))

        def weights(step: int, batches: int) -> list[float]:
            model = torch.nn.Linear(1, 1)
            run = training.TrainingRun(args, acc, loader, sampler, model,
                                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), stage="UNet")
            run.global_step = run.start_step = step  # what resume() sets (epoch 0)
            seen = []
            loop = run.batches()
            for _ in itertools.islice(loop, batches):
                seen.append(run._weight)
            loop.close()
            return seen

        assert weights(0, 5) == [1, 1, 1, 1, 2]
        assert weights(1, 3) == [1, 1, 2]
    finally:
        reset_accelerate()


def test_resume_moves_the_lr_schedule_of_a_checkpoint_written_by_more_processes(tmp_path):
    """resume() itself repositions the schedule when the checkpoint was written by another number of processes (the
    test above calls reposition_lr_schedule directly; only the slow 2-process run went through resume): a step-2
    checkpoint of 4 processes, whose schedule stands at 2 x 4 = 8 of 8 (rate 0), goes on at step 2 of 8 on one."""
    from accelerate import Accelerator

    reset_accelerate()
    try:
        acc = Accelerator(cpu=True)
        args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=0, scale_lr=False, output_dir=str(tmp_path))
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = training.make_lr_scheduler(optimizer, args, acc, max_train_steps=8)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        for _ in range(8):  # the 4 processes' scheduler steps of 2 optimizer steps
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == 0.0
        path = training.save_checkpoint(acc, tmp_path, 2, {"meta": {"run": {"num_processes": 4}}}, None)
        run = object.__new__(training.TrainingRun)
        run.args = SimpleNamespace(**vars(args), resume_from_checkpoint=str(path))
        run.accelerator, run.lr_scheduler, run.ema, run.output_dir = acc, scheduler, None, tmp_path
        run.record, run.max_train_steps, run.steps_per_epoch = {"num_processes": 1}, 8, 4
        run.restore_extra_state = lambda tensors, meta: None
        run.resume()
        assert run.global_step == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.75)
    finally:
        reset_accelerate()


@pytest.mark.parametrize("split, recorded", [("patient", {"val_fraction": 0.2, "split_seed": 3}), ("given", {})])
def test_training_data_json_records_what_drew_the_held_out_patients(tmp_path, split, recorded):
    """--split patient draws the held-out patients with --val_fraction and the split seed: training_data.json
    says so itself (evaluate redraws them from it where training_args.json was not copied along)."""
    from conftest import toy_slices

    from adni_diffusers import train_unet, training
    from adni_diffusers.data import SliceData

    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", str(tmp_path), "--report_to", "none", "--split",
                                  split, *(["--val_fraction", "0.2", "--split_seed", "3"] if split == "patient" else [])])
    data = SliceData(toy_slices(seed=0), toy_slices(seed=1), ["AD", "NC"], split, "/data/AD_NC", "pad")
    training.save_run_info(tmp_path, args, data, "folder")
    saved = json.loads((tmp_path / "training_data.json").read_text())
    assert {k: saved[k] for k in ("val_fraction", "split_seed") if k in saved} == recorded


def test_the_warm_up_warning_names_the_rate_scale_lr_made(tmp_path, caplog):
    """--scale_lr linear at batch 16 (default batch 64) trains at a quarter of --learning_rate: a warm-up as long as
    the run warned of peaking at 4e-05 "never reaching 0.0001", a rate the run never meant (its peak is 1e-05)."""
    import logging

    from accelerate import Accelerator

    from diffusers.optimization import get_scheduler

    reset_accelerate()
    try:
        acc = Accelerator(cpu=True)
        args = SimpleNamespace(seed=0, train_batch_size=16, gradient_accumulation_steps=1, max_train_steps=4,
                               trace_batches=False, output_dir=str(tmp_path), learning_rate=1e-4, scale_lr="linear",
                               lr_warmup_steps=10, lr_scheduler="constant_with_warmup")
        model = torch.nn.Linear(1, 1)
        with caplog.at_level(logging.INFO, logger="adni_diffusers"):
            optimizer = training.make_optimizer(model.parameters(), SimpleNamespace(
                **vars(args), adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8), acc, 64)
            get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=10)  # sets initial_lr, as training's
            training.TrainingRun(args, acc, [0] * 4, None, model, optimizer=optimizer, stage="UNet")
    finally:
        reset_accelerate()
    assert "--scale_lr linear: learning rate 2.5e-05 (--learning_rate 0.0001 for a batch of 64; this run's is 16)" \
        in caplog.text
    assert "the learning rate peaks at 7.5e-06, never reaching 2.5e-05 (--learning_rate 0.0001, --scale_lr linear)" \
        in caplog.text


@pytest.mark.parametrize("schedule, said", [("constant", True), ("constant_with_warmup", False), ("cosine", False)])
def test_a_warm_up_the_constant_schedule_drops_is_said(tmp_path, caplog, schedule, said):
    """diffusers' get_scheduler builds "constant" without num_warmup_steps: `--lr_scheduler constant` (with the
    default --lr_warmup_steps 100, or one given) trained at the full rate from step 1 without a word."""
    import logging

    from accelerate import Accelerator

    from diffusers.optimization import get_scheduler

    reset_accelerate()
    try:
        acc = Accelerator(cpu=True)
        args = SimpleNamespace(seed=0, train_batch_size=16, gradient_accumulation_steps=1, max_train_steps=40,
                               trace_batches=False, output_dir=str(tmp_path), learning_rate=1e-4, scale_lr=False,
                               lr_warmup_steps=10, lr_scheduler=schedule)
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        schedule_made = get_scheduler(schedule, optimizer, num_warmup_steps=10, num_training_steps=40)
        with caplog.at_level(logging.INFO, logger="adni_diffusers"):
            training.TrainingRun(args, acc, [0] * 4, None, model, optimizer=optimizer, stage="UNet",
                                 lr_scheduler=schedule_made)
    finally:
        reset_accelerate()
    if said:  # (and indeed: the rate of step 1 is the full one)
        assert optimizer.param_groups[0]["lr"] == 1e-4
    assert ("--lr_scheduler constant has no warm-up: --lr_warmup_steps 10 is not used" in caplog.text) == said


@pytest.mark.parametrize("use_cpu", ["True", "False"])
def test_a_cpu_launch_that_started_one_of_several_processes_says_so(monkeypatch, caplog, use_cpu):
    """`accelerate launch --cpu --num_processes 2` (no --multi_gpu) starts ONE process: Accelerate's simple launcher
    sets ACCELERATE_USE_CPU=True and MASTER_ADDR, no WORLD_SIZE (read from accelerate 1.16.0 and run, 2026-12-05). The run
    trained on one process without a word; the log now says so, and how to get the processes asked for. A MULTI_CPU
    config without use_cpu, or --num_processes 2 without --multi_gpu where CUDA sees no GPU, start one process too
    with ACCELERATE_USE_CPU=False: they had trained on one without a word (a helper's runs, 2026-12-06)."""
    one = SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cpu"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # every `accelerate launch` sets it
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(training, "launcher_flags", lambda: ["--cpu", "--num_processes", "2"])
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(one)
    assert "one process: `accelerate launch` was asked for 2, but its simple launcher starts a single process " \
           "here (with --cpu, with a MULTI_CPU config, or without --multi_gpu" in caplog.text
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training, "launcher_flags", lambda: ["--config_file", "multi_cpu.yaml"])  # the config's count
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(one)
    assert "one process: if `accelerate launch` was asked for several (its --num_processes or the config's), its " \
           "simple launcher starts a single process here" in caplog.text
    caplog.clear()
    # one process asked for, in a job whose script exported a MASTER_ADDR (passed on by the launcher): nothing to say
    monkeypatch.setattr(training, "launcher_flags", lambda: ["--num_processes=1"])
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(one)
    assert caplog.text == ""
    caplog.clear()
    monkeypatch.delenv("MASTER_ADDR")  # `--cpu` alone, or --num_processes 1: one process was asked for
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(one)
    assert caplog.text == ""
    # a one-process launch on a GPU in a job whose script exported a MASTER_ADDR of its own: the launcher passes it
    # on, and one process was asked for (a reviewer's check, 2026-12-06)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cuda")))
    assert caplog.text == ""
    # a plain `python train_unet.py` in a shell that exports a MASTER_ADDR of its own: no launcher, nothing said
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        training.check_world_size(one)
    assert caplog.text == ""


@pytest.mark.parametrize("variable", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_copies_started_by_srun_or_mpirun_without_accelerate_are_refused(monkeypatch, variable):
    """`srun -n 2 python train_unet.py` (no `accelerate launch`): on GPUs Accelerate reads no Slurm or MPI variable,
    so each copy ran alone on all the data and wrote the same folder (reproduced: one copy crashed on the other's
    checkpoint-3.tmp, history.jsonl held steps 1,1,2,2,3,3). Under `accelerate launch` (WORLD_SIZE set) and for
    one task, nothing is said."""
    one = SimpleNamespace(num_processes=1, is_main_process=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    training.check_world_size(one)
    monkeypatch.setenv(variable, "2")
    with pytest.raises(training.TrainingError, match=rf"^{variable}=2: the launcher started several copies .* "
                                                     r"docs/slurm/train_unet.sbatch"):
        training.check_world_size(one)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's workers, inside `srun ... accelerate launch`
    training.check_world_size(SimpleNamespace(num_processes=4, is_main_process=True))


def test_a_run_started_twice_by_srun_stops_before_writing(tmp_path, demo_root, monkeypatch, capsys):
    from adni_diffusers import train_vqmodel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    out = tmp_path / "vq"
    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(out), *TINY_VQ_ARGS])
    assert code == 2 and "SLURM_STEP_NUM_TASKS=2: the launcher started several copies" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_fsdp_and_deepspeed_configs_are_refused(kind):
    """An `accelerate config` set to FSDP or DeepSpeed was accepted; its checkpoints (pytorch_model_fsdp_0/, ...)
    could never be resumed, and the EMA and the saved model saw one shard. (On the CPU Accelerate does not turn
    FSDP on, so the check is tested on its own; make_accelerator calls it.)"""
    from accelerate.utils import DistributedType

    with pytest.raises(training.TrainingError, match=rf"Accelerate is set to {kind}: adni-diffusers trains with "
                                                     r"data parallel \(DDP"):
        training.check_distributed_type(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        training.check_distributed_type(SimpleNamespace(distributed_type=getattr(DistributedType, fine)))


def test_log_lines_go_above_the_progress_bar_only_where_they_print_to_the_console(monkeypatch):
    """The training loop sends console log lines through tqdm (above its bar, not glued to its line). A logger
    without a console handler (a notebook's or a test's own logging set-up) is left alone: tqdm's redirect would
    add a stderr handler to it for the whole loop."""
    import logging
    import sys

    from adni_diffusers import training

    root, diffusers_logger = logging.getLogger(), logging.getLogger("diffusers")
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(open(os.devnull, "w"))])  # a file: not a console
    monkeypatch.setattr(diffusers_logger, "handlers", [])
    before = list(root.handlers)
    with training.console_logs_above_progress_bars():
        assert root.handlers == before and diffusers_logger.handlers == []
    root.handlers[0].stream.close()
    console = logging.StreamHandler(sys.stderr)
    root.handlers = [console]
    diffusers_logger.handlers = [logging.StreamHandler(sys.stderr)]  # diffusers' own, which does not propagate
    with training.console_logs_above_progress_bars():
        for logger in (root, diffusers_logger):
            assert len(logger.handlers) == 1 and type(logger.handlers[0]).__name__ == "_TqdmLoggingHandler"
    assert root.handlers == [console]


def test_a_sweeps_hparams_table_opens_on_the_flags_that_differ(tmp_path):
    """Each run wrote the experiment's columns too (as SummaryWriter.add_hparams does): TensorBoard took the first
    run's for the whole --logdir, with every flag marked "same in all runs" (and a flag None there typed as text), so
    a sweep's table opened on adam_beta1... and the swept --learning_rate and --snr_gamma were hidden. Each run now
    gives its flags alone, and TensorBoard works the columns out from all the runs: the swept flags first, and the
    runs' scalars (the held-out loss, in the objective's measure too) as the metrics to sort them by."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from conftest import reset_accelerate, tensorboard_hparams_experiment

    for name, learning_rate, snr_gamma in (("base", 1e-4, None), ("lr", 1e-3, None), ("snr", 1e-4, 5.0)):
        reset_accelerate()
        try:
            accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / name))
            args = SimpleNamespace(learning_rate=learning_rate, snr_gamma=snr_gamma, adam_beta1=0.9, seed=0)
            training.start_logging(accelerator, args, "unet")
            accelerator.log({"loss": 1.0, "val_loss": 0.5, **({"val_objective": 0.7} if snr_gamma else {})}, step=1)
            accelerator.log({"final/val_loss": 0.4}, step=1)
            accelerator.end_training()
        finally:
            reset_accelerate()
    experiment = tensorboard_hparams_experiment(tmp_path)
    columns = [(h.name, h.differs) for h in experiment.hparam_infos]
    assert columns[:2] == [("learning_rate", True), ("snr_gamma", True)], columns
    assert ("adam_beta1", False) in columns
    assert {m.name.tag for m in experiment.metric_infos} == {"loss", "val_loss", "val_objective", "final/val_loss"}


def test_a_sweeps_runs_given_one_logging_dir_are_each_their_own_in_tensorboard(tmp_path):
    """Runs given one --logging_dir (outside their --output_dir) all wrote into <logging_dir>/unet: TensorBoard showed
    the last run's curves (the earlier ones hidden) beside the first run's flags in the HParams table, crediting one
    run's result to another's settings. Each writes into a subfolder named after its --output_dir now; the default
    --logging_dir (logs, inside --output_dir) is as before."""
    from conftest import reset_accelerate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from adni_diffusers import train_unet

    shared = tmp_path / "tensorboard"
    # two output folders of one name (exp1/unet, exp2/unet): their paths from the folder both are in tell them apart
    runs = {"exp1/unet": 1e-4, "exp2/unet": 1e-3, "inside": 1e-4}
    for name, learning_rate in runs.items():
        args = train_unet.parse_args(["--vqmodel", "vq", "--output_dir", str(tmp_path / "sweep" / name),
                                      "--learning_rate", str(learning_rate), "--report_to", "tensorboard",
                                      *(["--logging_dir", str(shared)] if name != "inside" else [])])
        reset_accelerate()
        try:
            accelerator = training.make_accelerator(args, "unet")
            training.start_logging(accelerator, args, "unet")
            accelerator.log({"final/val_loss": learning_rate}, step=1)
            accelerator.end_training()
        finally:
            reset_accelerate()
        folder = shared / "sweep" / name if name != "inside" else tmp_path / "sweep" / name / "logs"
        assert f"tensorboard --logdir {folder}" in training.where_to_watch(args)
        events = EventAccumulator(str(folder / "unet")).Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["learning_rate"].number_value == learning_rate  # the run's own flags
        assert [e.value for e in events.Scalars("final/val_loss")] == [pytest.approx(learning_rate)]
    assert sorted(str(p.relative_to(shared)) for p in shared.glob("*/*/*")) == ["sweep/exp1/unet", "sweep/exp2/unet"]


def test_a_fresh_run_into_a_logging_dir_with_an_earlier_runs_events_hides_them(tmp_path, caplog):
    """--logging_dir outside --output_dir is never cleared: a second fresh run's curves read 1, 2, 1, 2 beside the
    first run's. TensorBoard now hides the earlier events (purged from step 0; the files stay) and the log says
    so; a resumed run purges from its own step, as before."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from conftest import reset_accelerate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(losses, start_step=0):
        # each run's event file in a second of its own, as real runs are: files of one second are read in the order
        # of their names, whose last part is a counter (…9 after …10: the test failed in a full run, at 10)
        import time

        time.sleep(1.01 - time.time() % 1)
        reset_accelerate()
        try:
            accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
            training.start_logging(accelerator, SimpleNamespace(seed=0), "unet", start_step)
            for step, loss in losses:
                accelerator.log({"loss": loss}, step=step)
            accelerator.end_training()
        finally:
            reset_accelerate()
        return [(e.step, e.value) for e in EventAccumulator(str(tmp_path / "unet")).Reload().Scalars("loss")]

    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        assert run([(1, 5.0), (2, 4.0), (3, 3.0)]) == [(1, 5.0), (2, 4.0), (3, 3.0)]
        assert "earlier run" not in caplog.text
        assert run([(1, 9.0), (2, 8.0)]) == [(1, 9.0), (2, 8.0)]  # not 1, 2, 3, 1, 2
        assert f"--logging_dir: {tmp_path / 'unet'} holds an earlier run's tensorboard events" in caplog.text
        caplog.clear()
        assert run([(2, 7.0)], start_step=1) == [(1, 9.0), (2, 7.0)]  # a resume at step 1: its own steps replaced
        assert "earlier run" not in caplog.text
    assert len(list((tmp_path / "unet").glob("events.out.tfevents.*"))) == 3  # nothing deleted


def test_more_accumulated_batches_than_an_epoch_holds_are_refused(tmp_path, demo_root):
    """24 training images at batch 4 are 6 batches an epoch: --gradient_accumulation_steps 100 made each step the
    whole epoch, 24 images, while the log said "4 x 100 accumulated = 400 images per step" (and --scale_lr scaled
    by 400)."""
    from conftest import TINY_VQ_ARGS, run_training_script

    with pytest.raises(training.TrainingError, match=r"--gradient_accumulation_steps 100: more than the 6 batches of "
                                                     r"an epoch \(24 training images, batch 4 x 1 process\(es\)\).* "
                                                     r"give at most 6"):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out",
                                              *TINY_VQ_ARGS, "--gradient_accumulation_steps", "100"])


def test_a_dynamo_backend_in_the_accelerate_config_is_taken_as_compile_or_refused():
    """A dynamo backend in the accelerate config made `prepare` compile the model: with --compile as well the run
    crashed ('function' object has no attribute 'parameters': torch.compile of a compiled module is a function),
    and without it the run had none of --compile's child check and eager fallback. INDUCTOR is taken as --compile
    (its mode too), and prepare() then leaves the model alone; another backend is refused with the way out."""
    from argparse import Namespace

    from accelerate import Accelerator
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin, is_compiled_module
    from conftest import reset_accelerate

    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="inductor", mode="max-autotune"))
        args = Namespace(compile=False, compile_mode=None)
        training.adopt_config_compile(accelerator, args)
        assert args.compile is True and args.compile_mode == "max-autotune"
        assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
        assert not is_compiled_module(accelerator.prepare(torch.nn.Linear(2, 2)))  # maybe_compile's to do
        given = Namespace(compile=True, compile_mode="default")  # the script's own flag wins
        reset_accelerate()
        training.adopt_config_compile(Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="inductor",
                                                                                          mode="max-autotune")), given)
        assert given.compile_mode == "default"
        reset_accelerate()
        other = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="aot_eager"))
        with pytest.raises(training.TrainingError, match=r"dynamo_backend AOT_EAGER .*Set dynamo_backend to NO .*"
                                                         r"pass --compile"):
            training.adopt_config_compile(other, Namespace(compile=False, compile_mode=None))
    finally:
        reset_accelerate()


def test_python_runs_say_that_they_read_no_accelerate_config(tmp_path, monkeypatch, caplog):
    """`python train_*.py` (the way README gives one-process batch jobs) reads no accelerate config: a default config
    of bf16 trained in float32 without a word."""
    from argparse import Namespace

    import accelerate.commands.config.config_args as config_args

    config = tmp_path / "default_config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\n")
    monkeypatch.setattr(config_args, "default_config_file", str(config))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        training.warn_if_the_accelerate_config_is_not_read(Namespace(mixed_precision=None))
    assert f"the accelerate config ({config}) says mixed_precision bf16, but only `accelerate launch` reads it" \
           in caplog.text and "Pass --mixed_precision bf16 to the script" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        training.warn_if_the_accelerate_config_is_not_read(Namespace(mixed_precision="no"))  # asked for
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # under the launcher
        training.warn_if_the_accelerate_config_is_not_read(Namespace(mixed_precision=None))
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        config.write_text("mixed_precision: 'no'\n")
        training.warn_if_the_accelerate_config_is_not_read(Namespace(mixed_precision=None))
    assert caplog.text == ""


def test_a_resume_in_another_precision_is_said(tmp_path, caplog):
    """A run started under `accelerate launch` with a bf16 config and resumed with `python` (as the batch-job advice
    says) went on in float32 without a word; only the records said so afterwards."""
    from argparse import Namespace

    args = Namespace(**{name: 1 for name in training.RESUME_MUST_MATCH})
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text(json.dumps(
        {"step": 2, "run": training.run_record(args, stage="vqmodel", num_processes=1, precision="bf16")}))
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        training.check_resume_matches(checkpoint, training.run_record(args, stage="vqmodel", num_processes=1,
                                                                      precision="no"))
    assert f"resuming {checkpoint} in float32; it was trained in bf16 (give --mixed_precision bf16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        training.check_resume_matches(checkpoint, training.run_record(args, stage="vqmodel", num_processes=1,
                                                                      precision="bf16"))
    assert caplog.text == ""


def test_a_deepspeed_config_is_refused_before_accelerate_asks_to_install_deepspeed(tmp_path, monkeypatch):
    """Without deepspeed installed, Accelerator() under a DeepSpeed config said "pip3 install deepspeed", only for
    the run to be refused as DeepSpeed once it was."""
    from argparse import Namespace

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(training.TrainingError, match=r"Accelerate is set to DeepSpeed: adni-diffusers trains with "
                                                     r"data parallel"):
        training.make_accelerator(Namespace(output_dir=str(tmp_path / "out"), logging_dir="logs"), "vqmodel")


def test_a_second_run_in_one_process_may_take_another_precision(demo_root, tmp_path):
    """A notebook's second training run with another --mixed_precision stopped in Accelerate's "restart your
    runtime completely": its state is kept per process. Each run starts from a fresh one now. And the session's
    logging is its own again after a run (the root logger had been left at INFO with a console handler)."""
    import json
    import logging

    root = logging.getLogger()
    session = (root.level, list(root.handlers), logging.getLogger("accelerate").level)

    from conftest import TINY_VQ_ARGS, reset_accelerate

    from adni_diffusers import train_vqmodel

    reset_accelerate()
    try:
        for precision in ("no", "bf16"):  # (no reset in between: what a notebook does)
            out = tmp_path / precision
            train_vqmodel.main(train_vqmodel.parse_args([
                "--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps", "1",
                "--mixed_precision", precision, *TINY_VQ_ARGS]))
            assert json.loads((out / "training_args.json").read_text())["mixed_precision_used"] == precision
            assert (root.level, list(root.handlers), logging.getLogger("accelerate").level) == session
    finally:
        reset_accelerate()


def test_bars_redraw_seldom_where_stderr_is_a_log_file(monkeypatch):
    """tqdm redraws up to 10 times a second with a carriage return: in a SLURM .out that is one line growing for the
    whole run. Where stderr is no terminal, a bar redraws every LOG_FILE_BAR_SECONDS (training logs plain lines)."""
    import io
    import sys

    from adni_diffusers import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.on_a_terminal()
    with progress.progress_bar(total=3, file=sys.stderr) as bar:
        assert bar.mininterval == progress.LOG_FILE_BAR_SECONDS
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.on_a_terminal()
    with progress.progress_bar(total=3, file=sys.stderr) as bar:
        assert bar.mininterval == 0.1  # tqdm's own
    assert progress.progress_bar(total=1, mininterval=5, file=sys.stderr).mininterval == 5  # asked for: kept

    class NotebookStream(io.StringIO):  # ipykernel's OutStream: no tty, but bars draw in place there
        def isatty(self):
            return False

    NotebookStream.__module__ = "ipykernel.iostream"
    assert progress.on_a_terminal(NotebookStream())


def test_a_bar_in_a_log_file_draws_at_its_pace_not_at_every_postfix_or_monitor_tick(monkeypatch):
    """The feature net's bar set its postfix (a redraw) at every step: 322 redraws of one line for 10 toy epochs in a
    log file. And tqdm's monitor thread redrew an iterable's stale count every 10 s."""
    import io
    import sys

    from adni_diffusers import progress
    from adni_diffusers.features import train_feature_net
    from conftest import toy_slices

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress.progress_bar(range(3), file=log) as bar:
        assert bar.miniters == 1 and not bar.dynamic_miniters
    log.seek(0)
    log.truncate()
    train = toy_slices(patients=8, per_patient=16, size=32)
    train_feature_net(train, toy_slices(patients=4, per_patient=4, size=32, seed=1), epochs=3, batch_size=8,
                      device="cpu")
    assert log.getvalue().count("\r") <= 4, log.getvalue()  # the first and the last draw (and their clears)


def test_a_bar_in_a_log_file_is_lines_that_log_lines_do_not_share_and_a_closed_bar_stays(monkeypatch):
    """In a log file (a SLURM .out), tqdm's carriage returns put every draw of a bar, the next bars and the log
    line after them on one physical line: an `evaluate --ablations` log had its 9 ablation bars, their 30-second
    redraws and "INFO ... model card re-rendered" on one 2,000-character line, and a log line written during a bar
    came after the bar's draw and its blanking on the same line. Its bars (leave=False) were blanked at the end:
    nothing said how long the 1000-step ablation took. There: one line per draw, and the last draw stays."""
    import io
    import sys

    from adni_diffusers import progress

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])  # basicConfig's
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    with progress.console_logs_above_progress_bars():
        for i in progress.progress_bar(range(3), desc="sampling", leave=False):
            if i == 1:
                logging.getLogger("adni_diffusers.test").info("half way")
        logging.getLogger("adni_diffusers.test").info("after the bar")
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n"), repr(text)
    lines = text.splitlines()
    assert lines[0].startswith("sampling:   0%") and "half way" in lines[1] and lines[1].startswith("half way")
    assert lines[-2].startswith("sampling: 100%") and "3/3" in lines[-2], lines
    assert lines[-1] == "after the bar"


def test_save_run_info_records_the_demo_builds_seed_and_size(tmp_path):
    """A model of the demo set named only `"source": "demo"`: the demo-data build's seed and size (which decide its
    bytes, and so the model's) were nowhere in the model's records or on the Hub. training_data.json now carries
    them, also where the data given was one split folder of the build."""
    build = tmp_path / "AD_NC"
    (build / "train").mkdir(parents=True)
    (build / "demo_settings.json").write_text(json.dumps({"format_version": 1, "subjects": 6, "slices_per_subject": 20,
                                                          "test_fraction": 0.3, "seed": 7, "complete": True}))
    args = SimpleNamespace(learning_rate=1e-4)
    expected = {"subjects": 6, "slices_per_subject": 20, "test_fraction": 0.3, "seed": 7}
    for root in (build, build / "train"):
        out = tmp_path / f"out-{root.name}"
        out.mkdir()
        data = SimpleNamespace(summary=lambda root=root: {"root": str(root), "images": 1}, split="given")
        training.save_run_info(out, args, data, "demo")
        assert json.loads((out / "training_data.json").read_text())["demo_data"] == expected
    out = tmp_path / "out-user"
    out.mkdir()
    training.save_run_info(out, args, SimpleNamespace(summary=lambda: {"root": str(tmp_path), "images": 1},
                                                      split="given"), "user")
    assert "demo_data" not in json.loads((out / "training_data.json").read_text())


def test_finding_no_checkpoint_is_silent(tmp_path, caplog):
    """A run looks for its checkpoint several times (its checks, the resume): the look is silent, and the run says
    once that `latest` found none (test_a_fresh_start_begins_a_new_loss_history). A module-level set of folders
    already told kept the message to once per folder per Python process: a second run into the same fresh folder
    in one process was not told."""
    import argparse
    import logging

    from adni_diffusers import training

    args = argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(tmp_path / "fresh"))
    with caplog.at_level(logging.DEBUG, logger="adni_diffusers.training"):
        assert training.find_resume_checkpoint(args) is None
    assert caplog.records == []


def test_a_second_run_into_a_folder_a_live_run_trains_into_is_refused_before_it_touches_it(tmp_path, demo_root,
                                                                                          capsys, monkeypatch):
    """A job submitted twice (or a rerun while the first run, orphaned by a killed launcher, still trained) trained
    beside the first in one --output_dir: both wrote checkpoints and a model, and the history read 40, 41, 42, 41,
    43... The folder's .training_in_progress names the first run's process: while it runs on this host, a second
    run is refused before it changes anything (prepare_output_dir would have removed the first's save under way)."""
    import socket
    import subprocess
    import sys

    from adni_diffusers import hub, train_vqmodel, training

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-3.tmp").mkdir()  # the first run's checkpoint, being saved

    def mark(pid, script="train_vqmodel.py"):
        (out / hub.TRAINING_MARKER).write_text(json.dumps(
            {"pid": pid, "host": socket.gethostname(), "script": script, "started": "2026-12-07T07:00:00+00:00"}))

    # a process that reads as `python ... train_vqmodel.py` in /proc, as the first run's does
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "train_vqmodel.py"])
    # a pid reused by another program (pytest running tests/test_train_vqmodel.py is not a training run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "tests/test_train_vqmodel.py"])
    try:
        mark(first.pid)
        code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps",
                                  "2", "--resume_from_checkpoint", "latest", *map(str, TINY_VQ_ARGS)])
        err = capsys.readouterr().err
        assert code == 2 and f"--output_dir {out}: train_vqmodel.py (pid {first.pid}, started " \
            "2026-12-07T07:00:00+00:00) is training into it on this host" in err, err
        assert (out / "checkpoint-3.tmp").is_dir()  # untouched
        mark(first.pid, script="train_unet.py")  # (the name recorded differs: the command line names ours)
        assert hub.live_training_run(out)
        if os.path.exists(f"/proc/{other.pid}/cmdline"):  # where /proc tells a pid's program
            mark(other.pid)
            assert hub.live_training_run(out) is None
        mark(os.getpid())  # this process's own marker (a run in this process cut short): no other run
        assert hub.live_training_run(out) is None
        mark(first.pid)
        (out / hub.TRAINING_MARKER).write_text(
            (out / hub.TRAINING_MARKER).read_text().replace(socket.gethostname(), "another-node"))
        assert hub.live_training_run(out) is None  # another host's process cannot be told alive or not
        mark(first.pid)
    finally:
        first.kill()
        other.kill()
        first.wait()
        other.wait()
    assert hub.live_training_run(out) is None  # the run is gone: a resume goes on (the marker is its cut-short sign)
    training.check_no_run_trains_into(out)


@pytest.mark.parametrize("name", ["train_vqmodel", "train_unet"])
def test_a_flag_error_names_the_script_when_called_from_python(name, monkeypatch, capsys):
    """From a notebook (`train_vqmodel.cli([...])`) argparse named the kernel: "usage: ipykernel_launcher.py ...",
    "ipykernel_launcher.py: error: unrecognized arguments", beside run_cli's own "train_vqmodel.py: error: ...".
    """
    import importlib
    import sys

    module = importlib.import_module(f"adni_diffusers.{name}")
    monkeypatch.setattr(sys, "argv", ["/env/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "k.json"])
    with pytest.raises(SystemExit):
        module.parse_args(["--output_dir", "o", "--no_such_flag"])
    err = capsys.readouterr().err
    assert f"usage: {name}.py" in err and f"\n{name}.py: error: " in err
    assert "ipykernel_launcher" not in err


@pytest.mark.parametrize("argv0, stage, expected", [
    ("train_vqmodel.py", "train_vqmodel", "python train_vqmodel.py"),
    ("/home/me/adni-diffusers/train_unet.py", "train_unet", "python train_unet.py"),
    # `accelerate launch -m adni_diffusers.train_vqmodel` (a wheel install has no top-level script): argv[0] is the
    # package module's own path, and `python train_vqmodel.py` named a file the user does not have
    (str(Path(training.__file__).with_name("train_vqmodel.py")), "train_vqmodel",
     "python -m adni_diffusers.train_vqmodel"),
    (str(Path(training.__file__).with_name("train_unet.py")), "train_unet", "python -m adni_diffusers.train_unet"),
    ("/usr/lib/python3/ipykernel_launcher.py", "train_unet", "python train_unet.py"),  # a notebook
    ("-c", "train_unet", "python train_unet.py"),
])
def test_stage_command_names_what_the_user_can_run(monkeypatch, argv0, stage, expected):
    monkeypatch.setattr("sys.argv", [argv0, "--preset", "tiny"])
    assert training.stage_command(stage) == expected


def test_stage_command_names_the_other_stage_the_same_way(monkeypatch):
    monkeypatch.setattr("sys.argv", [str(Path(training.__file__).with_name("train_vqmodel.py"))])
    assert training.stage_command("train_unet") == "python -m adni_diffusers.train_unet"
    monkeypatch.setattr("sys.argv", ["/repo/train_vqmodel.py"])
    assert training.stage_command("train_unet") == "python train_unet.py"


def test_the_launcher_warning_names_the_module_under_accelerate_launch_m(monkeypatch, caplog):
    import accelerate.commands.launch as launch

    if not hasattr(launch, "_terminate_process_tree"):
        pytest.skip("this accelerate's one-process launcher waits for its process")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(training, "launcher_flags", lambda: ["--num_processes", "1"])
    monkeypatch.setattr("sys.argv", [str(Path(training.__file__).with_name("train_vqmodel.py")), "--preset", "tiny"])
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.training"):
        training.warn_if_the_launcher_kills_early(SimpleNamespace(num_processes=1))
    assert "Start one-process jobs with `python -m adni_diffusers.train_vqmodel` and the same flags" in caplog.text


def test_a_run_from_python_gives_torchs_tf32_and_cudnn_settings_back(monkeypatch):
    """A notebook's sweep of `train_unet.cli([...])` calls: the run with --allow_tf32 --cudnn_benchmark set them
    process-wide, so every later run (and the sampling after it) trained with TF32 and cuDNN benchmarking on, while
    its training_args.json said `"allow_tf32": false`."""
    from argparse import Namespace

    import torch

    from adni_diffusers import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU notebook sees (the flags are CUDA's)
    settings = training.torch_backend_settings()
    before = [getattr(module, name) for module, name in settings]
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        seen = []

        @training.keeps_session_logging
        def run(args):
            training.apply_backend_flags(args)
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark))

        run(Namespace(allow_tf32=True, cudnn_benchmark=True))
        assert seen == [(True, True)]  # the run itself gets what it asked for
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == (False, False)
        run(Namespace(allow_tf32=False, cudnn_benchmark=False))
        assert seen[-1] == (False, False)  # the next run of the sweep: what its flags say
    finally:
        for (module, name), was in zip(settings, before):
            setattr(module, name, was)


def test_a_run_from_python_leaves_the_callers_random_numbers_where_they_were():
    """Each run seeds Python's, numpy's and torch's generators with --seed (accelerate's set_seed): a notebook's own
    draws after every run of a sweep started again from seed 0. They go on from where they were now."""
    import random

    import numpy as np
    from accelerate.utils import set_seed

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    training.keeps_session_logging(lambda: set_seed(0))()
    assert draws() == expected



def test_the_plain_log_line_paces_over_the_time_since_the_previous_line(monkeypatch, caplog):
    """A SLURM .out's progress line (every 30 s) gave the pace and time left of the last --logging_steps interval
    alone: a line whose interval held a checkpoint or sample grid said 5.7 images/s and 20 min left where the 30 s
    before it ran at 26.6 and 5 min were left (a 6,000-step CPU run, 2026-12-07). Over the time since the previous
    line the pace is the run's, checkpoints in their share."""
    run = object.__new__(training.TrainingRun)
    run.stage, run.max_train_steps = "UNet", 1000
    run._plain_logged_at = run._plain_logged_point = None
    clock = {"now": 0.0}
    monkeypatch.setattr(training.time, "monotonic", lambda: clock["now"])
    run._log_points = []
    said = []
    with caplog.at_level(logging.INFO, logger="adni_diffusers.training"):
        # a log every 10 steps (40 images) in 1 s, but the one ending at step 300 held an 11 s checkpoint
        t = 0.0
        for step in range(10, 310, 10):
            t += 11.0 if step == 300 else (1.0 if step > 10 else 0.0)
            clock["now"] = t
            run.global_step = step
            run._log_points.append((step, 1000.0 + t, 4 * step))
            run._log_plain_line({"loss": 0.5})
    said = [r.getMessage() for r in caplog.records if "UNet step" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("UNet step 10/1000") and "left" not in said[0], said
    # 290 steps (1,160 images) in 39 s: 29.74 images/s, and 700 steps left at 39/290 s each: 94 s
    assert said[1].startswith("UNet step 300/1000 (30%)"), said
    assert "29.74 images/s, about 1 min 34 s left" in said[1], said


def test_two_runs_started_together_into_one_folder_the_second_is_refused(tmp_path, demo_root, capsys):
    """Two runs started together with one --output_dir (a job array's tasks, a rerun while the first still loaded
    its data): the folder is marked as trained into only once the data is ready, so both passed that check, saved
    checkpoint-2 over each other, and one died on the other's checkpoint-4.tmp, the history and model a mix of both.
    The first run locks the folder from its start: the second is refused, naming it, and the lock ends with the run."""
    from adni_diffusers import files, train_vqmodel

    out = tmp_path / "run"
    argv = ["--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps", "1",
            *map(str, TINY_VQ_ARGS)]
    with another_process_holding(out, "--output_dir", "train_vqmodel.py") as first:  # the first run, loading its data
        assert train_vqmodel.cli(argv) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out}: another run is writing there now (train_vqmodel.py, pid {first.pid} on " in err, err
        assert "two runs in one folder mix their checkpoints" in err
        assert not (out / "checkpoint-1").exists() and not (out / "vqvae").exists()
    assert train_vqmodel.cli(argv) == 0  # the first run gone, its lock with it
    assert files.folder_in_use(out) is None and not (out / files.LOCK_FILE).exists()


@pytest.mark.parametrize("message, hinted", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 16515072 bytes. Error code 12 (Cannot allocate memory)", True),  # the base UNet at batch 256, CPU
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_an_out_of_memory_error_names_the_flags_that_lower_memory(tmp_path, capsys, message, hinted):
    """The CPU allocator's error is a bare torch traceback from inside a conv: the run says what to lower."""
    import argparse

    from adni_diffusers.training import run_cli

    def parse_args(argv):
        return argparse.Namespace(output_dir=str(tmp_path / "out"))

    def main(args):
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match="allocate|out of memory|shapes"):
        run_cli("train_unet.py", parse_args, main, argv=[])
    err = capsys.readouterr().err
    assert ("out of memory (the error below): lower --train_batch_size" in err) == hinted, err


@pytest.mark.parametrize("where, flag", [
    ("load_or_build", "in encoding the latent cache (the error below): lower --eval_batch_size;"),
    ("_sample_grid", "in a sample grid (the error below): lower --num_sample_images"),
    ("backward", "(the error below): lower --train_batch_size"),
])
def test_an_out_of_memory_error_outside_the_training_step_names_its_own_flag(tmp_path, capsys, where, flag):
    """An OOM while encoding the latent cache or drawing a sample grid is not lowered by --train_batch_size: the line
    names the flag of the work it came from (its traceback's function)."""
    import argparse

    from adni_diffusers.training import run_cli

    def parse_args(argv):
        return argparse.Namespace(output_dir=str(tmp_path / "out"))

    def work():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    work.__code__ = work.__code__.replace(co_name=where)  # as the package's function of that name raises it

    with pytest.raises(torch.OutOfMemoryError):
        run_cli("train_unet.py", parse_args, lambda args: work(), argv=[])
    assert f"train_unet.py: out of memory {flag}" in capsys.readouterr().err


def test_the_out_of_memory_advice_names_functions_that_exist():
    """A function renamed would lose its own advice silently: each name is still one of the package's functions."""
    from adni_diffusers import latents, train_unet, vq, vq_eval
    from adni_diffusers.training import OUT_OF_MEMORY_ELSEWHERE

    modules = (latents, train_unet, vq, vq_eval)
    assert all(any(callable(getattr(m, name, None)) for m in modules) for name in OUT_OF_MEMORY_ELSEWHERE)
