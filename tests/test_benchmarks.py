"""benchmarks/run.py --smoke on CPU: every section runs and reports positive numbers (no timing assertions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    md = out.with_suffix(".md")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--profile", "--profile-steps", "2",
                           "--out", str(out), "--markdown", str(md)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert not out.with_suffix(".partial.json").exists()  # the row-by-row record is replaced by the full one
    return json.loads(out.read_text()), md.read_text()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_machine_info_and_settings(smoke):
    results, _ = smoke
    m = results["machine"]
    for key in ("date", "command", "device", "device_name", "torch", "diffusers", "accelerate", "torch_threads"):
        assert m[key], key
    assert m["device"] == "cpu" and "--smoke" in m["command"]
    assert results["settings"]["preset"] == "tiny"
    assert _positive(results["matmul"]["flops_per_s"])
    for key in ("unet_train_per_image", "unet_forward_per_image", "vq_encode_per_image", "vq_decode_per_image",
                "vq_train_per_image", "unet_params", "vq_params"):
        assert _positive(results["flops"][key]), key
    # a training step is forward + backward: at least twice the forward
    assert results["flops"]["unet_train_per_image"] > 2 * results["flops"]["unet_forward_per_image"]


def test_every_section_has_positive_numbers(smoke):
    results, _ = smoke
    for section in ("unet", "latent_cache", "vq", "sampling"):
        rows = results[section]["rows"]
        assert rows, section
        for row in rows:
            assert "error" not in row, (section, row)
            assert _positive(row["images_per_s"]), (section, row)
            assert _positive(row["peak_memory_mb"]), (section, row)
            assert _positive(row["mfu"]), (section, row)
            assert row["mfu_of"] == "fp32", (section, row)  # on CUDA: bf16, or TF32 for fp32 rows
    # the example-style step encodes its batch with its VQModel: that work, in its time, is in its MFU too
    flops, rate = results["flops"], results["matmul"]["flops_per_s"]
    example = next(r for r in results["unet"]["rows"] if r["variant"] == "example style")
    assert example["mfu"] == pytest.approx(example["images_per_s"] * (
        flops["unet_train_per_image"] + flops["example_vq_encode_per_image"]) / rate)
    # the rows' config says what ran: no bf16 autocast and no fused AdamW on the CPU (it said both)
    assert not any(r["config"]["bf16"] or r["config"]["fused"] for section in ("unet", "vq")
                   for r in results[section]["rows"])
    variants = {r["variant"] for r in results["unet"]["rows"]}
    assert "example style" in variants and "ours + --latents_on_device" in variants
    assert _positive(results["unet"]["summary"]["speedup"])
    assert {r["variant"] for r in results["vq"]["rows"]} >= {"example style", "ours",
                                                             "ours, no channels_last (train_vqmodel's default)"}
    # the CUDA-only candidates (cudnn.benchmark, CUDA graphs) and compiled rows are not run on CPU without --compile
    assert not any(r["config"].get("cuda_only") or r["config"]["compile"]
                   for section in ("unet", "vq") for r in results[section]["rows"])
    samplers = {(r["sampler"], r["steps"]) for r in results["sampling"]["rows"]}
    assert samplers == {("ddpm", 2), ("dpm++", 2), ("unipc", 2)}  # labelled with the steps really run
    pipeline = [r for r in results["sampling"]["rows"] if r["path"] == "pipeline call"]
    assert pipeline and all(r["finite"] and r["image_shape"] == [1, 256, 256] for r in pipeline)
    assert all(r["warmup_calls"] == 1 for r in results["sampling"]["rows"])  # eager rows: one warm-up call
    [goal] = results["cpu_goal"]["rows"]  # --smoke: the tiny preset only
    assert "error" not in goal and goal["images"] == 4 and not goal["goal_configuration"] and goal["preset"] == "tiny"
    for key in ("load_seconds", "first_call_seconds", "load_and_sample_seconds", "second_call_seconds"):
        assert _positive(goal[key]), key


def test_training_rows_are_repeated_and_show_their_spread(smoke):
    results, table = smoke
    for section in ("unet", "vq"):
        for row in results[section]["rows"]:
            times = row["seconds_per_step_all"]
            assert len(times) == 2 and all(_positive(t) for t in times), row  # --smoke: 2 repeats
            assert row["seconds_per_step"] == pytest.approx(sum(times) / 2, rel=1e-3)  # the median of two
            assert row["spread"] == pytest.approx(abs(times[0] - times[1]) / row["seconds_per_step"], abs=1e-3)
    assert "| spread |" in table


def test_goals_are_reported_not_claimed(smoke):
    results, table = smoke
    goals = {g["goal"]: g for g in results["goals"]}
    assert len(goals) == 8
    for g in goals.values():  # a CPU smoke run measures no goal
        assert g["measured"] is None and g["status"].startswith("not measured"), g
    assert "no GPU" in goals["unet_images_per_s"]["status"]
    for heading in ("UNet training step", "VQ training step", "Latent-cache build", "Sampling end to end",
                    "CPU goal row", "Goals (issue 7)"):
        assert heading in table, heading


def test_profile_says_where_the_time_goes(smoke):
    results, table = smoke
    profiled = {section: [r for r in results[section]["rows"] if "profile" in r] for section in ("unet", "vq")}
    # one row per section: "ours" at the first batch size (on CPU without --compile: train_unet's default flags,
    # no channels_last)
    assert [r["variant"] for r in profiled["unet"]] == ["cached latents, fp32, eager"]
    assert [r["variant"] for r in profiled["vq"]] == ["ours"]
    for (row,) in profiled.values():
        p = row["profile"]
        assert p["steps"] == 2 and p["timed_by"] == "self CPU time" and p["busy_fraction"] is None
        assert 0 < p["busy_ms_per_step"] <= p["wall_ms_per_step"] * 1.5  # self times of one thread (+ loader)
        top = p["top"]
        assert 5 <= len(top) <= 20 and all(t["ms_per_step"] > 0 and t["calls_per_step"] > 0 for t in top)
        assert [t["ms_per_step"] for t in top] == sorted((t["ms_per_step"] for t in top), reverse=True)
        assert any("conv" in t["name"] for t in top)  # both models are convolutional
        assert f'Profile of "{row["name"]}"' in table
        # copies, by the operator that asked for them (looking past to/clone/contiguous to the reason)
        copies = p["copies"]
        assert copies and all(c["calls_per_step"] > 0 and " -> " in c["most_common"] for c in copies)
        assert [c["ms_per_step"] for c in copies] == sorted((c["ms_per_step"] for c in copies), reverse=True)
        assert not {c["called_from"] for c in copies} & {"aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"}
        assert any("backward" in c["called_from"] for c in copies)  # the backward pass copies (CPU: conv weights)
    assert table.count("`aten::copy_` by the operator that asked for it") == 2
    assert 0 < sum(t["share"] for t in profiled["unet"][0]["profile"]["top"]) <= 1.0001


def test_a_run_killed_midway_keeps_its_finished_rows(tmp_path):
    """A time limit (gpu_session.sh's `timeout`) may kill the benchmark; the rows finished so far stay on disk."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--sections", "unet", "vq",
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "bench.partial.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and '"section": "vq"' in partial.read_text():
            break  # a VQ row has finished: the UNet section is complete
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert partial.exists(), "no partial record: the benchmark ended, or had not written a row, before the kill"
    record = json.loads(partial.read_text())
    rows = record["rows"]
    assert not out.exists() and rows
    # the record says where and against what rate its rows ran, without the full JSON
    assert record["machine"]["device"] == "cpu" and record["matmul"]["flops_per_s"] > 0 and record["flops"]
    unet = [r for r in rows if r["section"] == "unet"]
    assert {r["variant"] for r in unet} >= {"example style", "ours + --latents_on_device"}
    assert all(r["images_per_s"] > 0 for r in unet)


def test_bad_flags_are_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--batch-sizes", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "batch sizes must be positive" in proc.stderr


@pytest.mark.parametrize("flag", ["--encode-images", "--matmul-size", "--profile-steps"])
def test_counts_that_would_fail_a_row_after_its_timing_are_refused(flag):
    """0 images to encode, a 0-size matmul or 0 profiled steps divided by zero once the row had run (or at the
    start, for the matmul rate): refused with the flag's name before any work."""
    run = _load_benchmark_script()
    with pytest.raises(SystemExit) as stop:
        run.parse_args(["--smoke", "--device", "cpu", flag, "0"])
    assert stop.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--preset", "tinny"], "--preset: unknown UNet2DModel preset 'tinny'"),  # a traceback after the matmul rate
    (["--vq-preset", "nope"], "--vq-preset: unknown VQModel preset 'nope'"),
    (["--threads", "-1"], "--threads -1: expected at least 1"),  # torch's traceback; 0 was ignored
    (["--threads", "0"], "--threads 0: expected at least 1"),
    (["--compile", "--compile-mode", "bogus"], "invalid choice: 'bogus'"),  # every row failed, exit status 0
])
def test_bad_presets_threads_and_compile_modes_are_refused_before_any_work(flags, message, capsys):
    run = _load_benchmark_script()
    with pytest.raises(SystemExit) as stop:
        run.parse_args(["--smoke", "--device", "cpu", *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_are_refused_before_any_row(tmp_path, capsys):
    """--out or --markdown naming a folder, or a path under a file, failed in a traceback after every row had run (on
    a GPU lease: the measurement lost, but for its .partial.json)."""
    run = _load_benchmark_script()
    (tmp_path / "afile").write_text("")
    for flags, message in [(["--out", str(tmp_path)], f"--out {tmp_path}: is a folder; expected a file name"),
                           (["--markdown", str(tmp_path / "afile" / "x.md")], f"{tmp_path / 'afile'} is a file")]:
        with pytest.raises(SystemExit) as stop:
            run.parse_args(["--smoke", "--device", "cpu", *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    run.parse_args(["--smoke", "--device", "cpu", "--out", str(tmp_path / "new" / "r.json")])  # made when written


@pytest.mark.parametrize("flags, message", [
    (["--variants", "+ torch.compile (= ours)"], "--variants: '+ torch.compile (= ours)' needs --compile"),
    (["--compile", "--variants", "ours + compile + cudnn.benchmark"], "runs on --device cuda only"),
    (["--profile", "--profile-variants", "ours + EMA (make_ema)"], "--profile-variants: unknown ['ours + EMA (make_ema)']"),
])
def test_rows_that_would_not_run_are_refused(flags, message, capsys):
    """A row named in --variants that cannot run with the flags given (no --compile, or a CUDA-only row on the
    CPU) was dropped without a word, and its section came out empty with exit status 0; a --profile-variants
    name was not checked at all (a near miss profiled nothing). Device time is short: refused before any work."""
    run = _load_benchmark_script()
    with pytest.raises(SystemExit) as stop:
        run.parse_args(["--smoke", "--device", "cpu", *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    run.parse_args(["--smoke", "--device", "cpu", "--compile", "--variants", "+ torch.compile (= ours)"])  # runs


def test_example_style_keeps_the_seed_sized_vq_encoder(smoke):
    """The example-style UNet row encodes every batch with the seed's VQ size (`wide`) where our VQModel is `base`
    (narrower since 2026-11-26), so its figure stays comparable with facts.md and the earlier runs."""
    run = _load_benchmark_script()
    assert run.parse_args(["--device", "cpu", "--preset", "base"]).example_vq_preset == "wide"
    assert run.parse_args(["--device", "cpu", "--preset", "base", "--example-vq-preset", "base"]).example_vq_preset == "base"
    assert run.parse_args(["--device", "cpu", "--preset", "small"]).example_vq_preset == "small"
    results, markdown = smoke
    assert results["unet"]["example_vq_preset"] == results["vq"]["vq_preset"]  # tiny presets: no `wide` to use
    assert f"the example style encodes with the `{results['unet']['example_vq_preset']}` VQModel" in markdown


def test_dtype_check_compares_bf16_with_float32_image_by_image(tmp_path, tiny_ldm):
    """benchmarks/dtype_check.py on the tiny pipeline: both classes, end to end and decode only."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("dtype_check", REPO_ROOT / "benchmarks" / "dtype_check.py")
    dtype_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dtype_check)
    x = torch.rand(2, 1, 8, 8)
    assert dtype_check.compare(x, x)["max_grey_level_difference"] == 0
    assert dtype_check.compare(x, (x + 0.5).clamp(0, 1))["psnr_min_db"] < 10

    out = tmp_path / "dtype.json"
    result = dtype_check.main(["--model", str(tiny_ldm), "--device", "cpu", "--num-images", "3", "--batch-size", "2",
                               "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["per_class"]) == {"AD", "NC"} and result["guidance"] == 2.0
    for numbers in result["per_class"].values():
        for part in ("end_to_end", "decode_only"):
            assert 0 <= numbers[part]["max_grey_level_difference"] <= 255
            assert numbers[part]["psnr_min_db"] <= numbers[part]["psnr_median_db"]
        # bf16 rounds: the images differ, but the same latents decode to nearly the same picture
        assert numbers["decode_only"]["psnr_min_db"] > 20


def _load_benchmark_script(path=SCRIPT, name="bench_run"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_variants_chooses_the_profiled_rows():
    """--profile profiles the "ours" row; --profile-variants names others (e.g. an EMA row), among those run."""
    from types import SimpleNamespace

    run = _load_benchmark_script()
    present = ["example style", "+ torch.compile (= ours)", "ours + EMA (make_ema: foreach=True)"]
    default = SimpleNamespace(profile_variants=None)
    assert run.profiled_variants(default, run.UNET_PROFILED, present) == {"+ torch.compile (= ours)"}
    assert run.profiled_variants(default, run.UNET_PROFILED, ["example style"]) == set()
    asked = SimpleNamespace(profile_variants=["ours + EMA (make_ema: foreach=True)", "+ channels_last"])
    assert run.profiled_variants(asked, run.UNET_PROFILED, present) == {"ours + EMA (make_ema: foreach=True)"}


def test_a_forced_layout_row_compiles_on_its_own_and_leaks_nothing():
    """The layout-optimization rows force inductor's flag for their own compilation only: a next row compiled
    with it on would price the flag, not itself."""
    import torch._inductor.config as inductor_config

    run = _load_benchmark_script()
    spec = run.UNET_VARIANTS["reduce-overhead + inductor layout optimization"]
    assert spec["mode"] == "reduce-overhead" and spec["cl"] and spec["compile"]
    default_mode = run.UNET_VARIANTS["ours + inductor layout optimization"]
    assert default_mode.get("mode") is None and default_mode["needs_compile"]
    assert "layout optimization forced" in run.compiled_words(spec)
    assert "layout" not in run.compiled_words(run.UNET_VARIANTS["+ torch.compile (= ours)"])
    assert inductor_config.force_layout_optimization is False
    resets = []
    run.fresh_compile_cache = lambda: resets.append("reset")
    with run.row_settings(default_mode):
        assert inductor_config.force_layout_optimization is True
    assert inductor_config.force_layout_optimization is False
    assert resets == ["reset", "reset"]  # a fresh compilation before the row and after it
    with run.row_settings(run.UNET_VARIANTS["+ torch.compile (= ours)"]):
        assert inductor_config.force_layout_optimization is False
    assert len(resets) == 2
    assert run.unet_row_blocked("ours + inductor layout optimization", False, False) == "needs --compile"
    assert run.unet_row_blocked("reduce-overhead + inductor layout optimization", True, False) == \
        "runs on --device cuda only"


def test_ours_at_the_other_batch_sizes_is_what_train_unet_runs():
    """train_unet --compile on one GPU compiles with CUDA graphs since 2026-12-04: on CUDA the other batch sizes
    time that row as "ours", not the default mode's 35% slower one."""
    from types import SimpleNamespace

    run = _load_benchmark_script()
    cuda, cpu = SimpleNamespace(cuda=True), SimpleNamespace(cuda=False)
    assert run.unet_variant_names(cuda, True, False) == [
        "example style", "ours, compile mode reduce-overhead", "reduce-overhead + --latents_on_device"]
    assert run.unet_variant_names(cpu, True, False) == [
        "example style", "+ torch.compile (= ours)", "ours + --latents_on_device"]
    assert run.unet_variant_names(cuda, False, False) == [
        "example style", "+ fused AdamW (= ours, eager)", "ours + --latents_on_device"]
    every = run.unet_variant_names(cuda, True, True)  # the first batch size: the whole ablation
    assert "+ torch.compile (= ours)" in every and "ours, compile mode reduce-overhead" in every


def test_the_next_gpu_plan_runs_its_rows_in_the_order_it_says():
    """The rows run in UNET_VARIANTS' order, not --variants'; the plan puts the deciding rows first so that a lease
    cut short keeps them (a review found the forced-layout row third, after the one it was to be compared with)."""
    import re
    from types import SimpleNamespace

    run = _load_benchmark_script()
    text = (REPO_ROOT / "docs" / "performance.md").read_text()
    plan = text[text.index("### Next GPU session"):]
    block = re.search(r'--variants((?:\s+"[^"$]+")+)', plan).group(1)
    names = re.findall(r'"([^"]+)"', block)
    assert len(names) == 3 and names[1] == "reduce-overhead + inductor layout optimization"
    assert run.unet_variant_names(SimpleNamespace(cuda=True), True, True, names) == names


def test_gpu_session_script_parses_and_names_only_known_benchmark_rows():
    """Device time is short: a typo in gpu_session.sh must show here, not after a machine has started."""
    import re

    for script in ("benchmarks/gpu_session.sh", "benchmarks/gpu_pack.sh", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(REPO_ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    run = _load_benchmark_script()
    known = set(run.UNET_VARIANTS) | set(run.VQ_VARIANTS)
    # the script, and the commands the docs give for the next device lease
    for doc, at_least in (("benchmarks/gpu_session.sh", 8), ("docs/performance.md", 8)):
        text = (REPO_ROOT / doc).read_text().replace("\\\n", " ")
        named = [name for block in re.findall(r'--variants((?:\s+"[^"$]+")+)', text)
                 for name in re.findall(r'"([^"]+)"', block)]
        assert len(named) >= at_least, doc
        assert set(named) <= known, f"unknown rows in {doc}: {sorted(set(named) - known)}"
    text = (REPO_ROOT / "benchmarks" / "gpu_session.sh").read_text()
    # the presets the script passes exist
    for preset in re.findall(r"(benchmarks/\w+\.json)", text):
        assert (REPO_ROOT / preset).is_file(), preset
    from adni_diffusers.presets import VQ_PRESETS

    vq_presets = re.findall(r"(?:--vq-preset|VQ_PRESET=)\s*([\w.]+)", text)
    assert "wide" in vq_presets and set(vq_presets) <= set(VQ_PRESETS), vq_presets


def test_gpu_session_quick_train_plan_runs_on_cpu(tmp_path):
    """The next GPU lease's plan (QUICK=train: one call) end to end with tiny models on the CPU, so that a
    renamed flag or a broken stage shows here and not on a machine that costs device time."""
    script = str(REPO_ROOT / "benchmarks" / "gpu_session.sh")
    run_dir = tmp_path / "next"
    env = dict(os.environ, QUICK="train", PRESET="tiny", VQ_PRESET="tiny", MP="no", COMPILE="", VQ_BATCH="4",
               UNET_BATCH="8", SUBJECTS="4", FORCE_VQ_STEPS="2", FORCE_UNET_STEPS="2", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="2", GIT_REV="test", SAMPLE_STEPS="2",  # (the plan's 50 took 80 s of the test)
               VQ_EXTRA="--eval_max_images 8 --validation_max_images 8")  # (40 held-out images: 8 s of the VQ stage)

    def call(**extra):
        return subprocess.run(["bash", script, str(run_dir)], env={**env, **extra}, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)

    early = call(SKIP_VQ="1")  # the UNet alone before any VQModel: a clear stop, not a UNet trained on nothing
    assert early.returncode == 1 and "SKIP_VQ=1 needs" in early.stdout
    # the VQ stage of QUICK=train is eager even where the session compiles (its model only feeds the UNet);
    # the plan alone says so (PLAN_ONLY=1: the commands are logged, none runs)
    vq_only = call(VQ_ONLY="1", COMPILE="--compile", PLAN_ONLY="1")
    log = (run_dir / "session.log").read_text()
    assert vq_only.returncode == 0, log
    vq_command = log.split("START train_vqmodel: ")[-1].splitlines()[0]
    assert "--compile" not in vq_command and "--max_train_steps 2" in vq_command
    assert "DONE (VQ_ONLY)" in log and "START train_unet" not in log and not (run_dir / "AD_NC").exists()
    run_dir = tmp_path / "whole"  # the plan as the lease runs it: one call in a fresh folder
    whole = call()
    log = (run_dir / "session.log").read_text()
    assert whole.returncode == 0, log
    assert all(f"END {stage} rc=0" in log for stage in ("demo_data", "train_vqmodel", "train_unet")), log
    assert json.loads((run_dir / "vq" / "metrics.json").read_text())["train_steps"] == 2
    args = json.loads((run_dir / "ldm" / "training_args.json").read_text())
    assert args["checkpointing_steps"] == 100 and args["vqmodel"] == str(run_dir / "vq")  # QUICK=train's flags
    assert json.loads((run_dir / "ldm" / "train_metrics.json").read_text())["train_steps"] == 2
    assert "DONE (TRAIN_ONLY)" in log
    assert "END offload_check rc=0" in log  # no CUDA here: the check says it did not run, and why
    assert json.loads((run_dir / "offload_check.json").read_text())["checked"] is False
    for product in ("metrics.json", "train_metrics.json"):  # how long each process lived after its final metrics
        assert re.search(rf"\] {product} written \d+ s before the stage's process ended", log), log
    # A stage that fails after it wrote its final metrics (on the H200 its time limit hit while the finished VQ run
    # exited) is not "finished" again from an older checkpoint, which would replace the model with that
    # checkpoint's. Here the failure is a --push_to_hub to a Hub that does not answer, after training.
    third = call(SKIP_VQ="1", HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_token",
                 UNET_EXTRA="--checkpointing_steps 1 --overwrite_output_dir --push_to_hub --hub_model_id someone/model "
                            "--sample_inference_steps 2")
    log = (run_dir / "session.log").read_text().split("SKIP_VQ=1: reusing")[-1]
    assert third.returncode == 0 and "END train_unet rc=" in log and "END train_unet rc=0" not in log, log
    assert (run_dir / "ldm" / "checkpoint-1").is_dir() and "nothing to finish" in log and "finishing" not in log
    assert json.loads((run_dir / "ldm" / "train_metrics.json").read_text())["train_steps"] == 2
    # The stages' limits add up to more than the call's `timeout 560`: each is cut to what is left of the deadline,
    # the UNet stage keeps RESERVE_AFTER_UNET of it for the offload check, and a stage with under 20 s is skipped
    # (the outer timeout would have killed bash alone, its stage's python running on while tar read the files).
    fourth = call(SKIP_VQ="1", DEADLINE_SECONDS="40", RESERVE_AFTER_UNET="30")
    log = (run_dir / "session.log").read_text().split("SKIP_VQ=1: reusing")[-1]
    assert fourth.returncode == 0 and "SKIP train_unet:" in log and "START train_unet" not in log, log
    assert "no time left to finish" in log and "END offload_check rc=0" in log, log


class _Parsed(Exception):
    """Raised in place of a command's work once argparse has accepted its command line."""


def _argparse_verdict(words: list[str], monkeypatch) -> str | None:
    """None when the program `words` names (python train_*.py, -m adni_diffusers.cli, benchmarks/*.py) accepts
    its flags and values as it would parse them, else argparse's message. Nothing runs: the training scripts'
    and run.py's own parse_args (with their checks) are called, and the other commands stop once parsed."""
    import argparse
    import contextlib
    import io

    from adni_diffusers import cli, train_unet, train_vqmodel

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))

    assert words[0] == "python", words
    program, argv = words[1], words[2:]
    stops_once_parsed = True
    if program == "-m":
        assert argv[0] == "adni_diffusers.cli", words
        entry = lambda: cli.main(argv[1:])  # noqa: E731
    elif program in ("train_vqmodel.py", "train_unet.py"):
        module = {"train_vqmodel.py": train_vqmodel, "train_unet.py": train_unet}[program]
        entry, stops_once_parsed = (lambda: module.parse_args(argv)), False
    else:
        assert program.startswith("benchmarks/") and program.endswith(".py"), words
        script = _load_benchmark_script(REPO_ROOT / program, Path(program).stem)
        stops_once_parsed = not hasattr(script, "parse_args")
        entry = (lambda: script.main(argv)) if stops_once_parsed else (lambda: script.parse_args(argv))
    errors = io.StringIO()
    with monkeypatch.context() as patch, contextlib.redirect_stderr(errors):
        if stops_once_parsed:
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr("torch.cuda.is_available", lambda: True)  # as on the lease's machine (run.py checks)
        try:
            entry()
        except _Parsed:
            pass
        except SystemExit:
            return errors.getvalue().strip().splitlines()[-1]
    return None


def _plan(run_dir, **env) -> str:
    """gpu_session.sh with PLAN_ONLY=1 (every stage's command logged, none run): its session.log."""
    run = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh"), str(run_dir)],
                         env=dict(os.environ, PLAN_ONLY="1", GIT_REV="test", **env), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    log = (run_dir / "session.log").read_text()
    assert run.returncode == 0 and "DONE" in log, log
    return log


BENCH_STAGES = {"bench_unet", "bench_unet512", "bench_vq", "bench_vq_candidate"}


@pytest.mark.parametrize("plan, stages", [
    ({}, {"bench_unet", "train_vqmodel", "train_unet", "evaluate", "generate_AD", "counterfactual"}),  # among others
    ({"QUICK": "1"}, BENCH_STAGES),
    ({"QUICK": "train"}, {"demo_data", "train_vqmodel", "train_unet", "offload_check"}),
    ({"VQ_PRESET": "wide", "VQ_ONLY": "1"}, BENCH_STAGES | {"bench_sampling", "bench_sampling_generate", "demo_data",
                                                           "train_vqmodel"})])
def test_gpu_session_plans_name_only_flags_their_programs_accept(tmp_path, plan, stages, monkeypatch):
    """Every command a GPU lease would run (PLAN_ONLY=1: logged, not run) parses as its program reads it: no
    renamed flag, unknown benchmark variant or bad choice is found on a machine that costs device time."""
    import shlex

    log = _plan(tmp_path / "plan", **plan)
    commands = {m[0]: shlex.split(m[1]) for m in re.findall(r"START (\w+): (.*)", log)}
    assert stages <= set(commands) if not plan else set(commands) == stages
    verdicts = {name: _argparse_verdict(words, monkeypatch) for name, words in commands.items()}
    assert verdicts == dict.fromkeys(commands), verdicts


def test_gpu_session_trains_for_the_seconds_the_benchmark_rates_give(smoke, tmp_path):
    """The full plan's step counts come from the benchmark's JSON of the same session (its "ours" rows at the
    training batch sizes): a renamed key or variant there would train for default rates' lengths, silently."""
    results, _ = smoke
    run_dir = tmp_path / "plan"
    run_dir.mkdir()
    for name in ("bench_unet.json", "bench_vq.json"):  # the smoke run holds both sections
        (run_dir / name).write_text(json.dumps(results))
    log = _plan(run_dir, SKIP_BENCHMARK="1", VQ_BATCH="2", UNET_BATCH="2", MIN_STEPS="1", VQ_SECONDS="1000",
                UNET_SECONDS="100")
    vq_rate = max(r["images_per_s"] for r in results["vq"]["rows"] if r["variant"] in ("ours", "ours + compile"))
    unet_rate = max(r["images_per_s"] for r in results["unet"]["rows"]
                    if r["config"]["data"] == "loader" and r["config"]["ema"] == "package")
    vq_steps, unet_steps = int(0.8 * 1000 * vq_rate / 2), int(0.8 * 100 * unet_rate / 2)
    assert (vq_steps, unet_steps) != (int(0.8 * 1000 * 150 / 2), int(0.8 * 100 * 2000 / 2))  # not the defaults
    assert f"VQ: {vq_steps} steps of 2; UNet: {unet_steps} steps of 2" in log, log


def test_gpu_session_sizes_another_vq_preset_from_its_own_rate(tmp_path):
    """VQ_PRESET=wide trains the wide first stage: its steps come from its own rows (bench_vq_candidate.json), not
    from base's (bench_vq.json), whose 1.8x rate made the stage overrun VQ_SECONDS by as much."""
    run_dir = tmp_path / "plan"
    run_dir.mkdir()
    for name, rate in (("bench_vq.json", 480.0), ("bench_vq_candidate.json", 266.0)):  # the H200's base and wide
        row = {"variant": "ours + compile", "batch_size": 32, "images_per_s": rate, "config": {}}
        (run_dir / name).write_text(json.dumps({"vq": {"rows": [row]}}))
    log = _plan(run_dir, VQ_PRESET="wide", SKIP_BENCHMARK="1", VQ_ONLY="1", VQ_SECONDS="180")
    assert f"VQ: {int(0.8 * 180 * 266.0 / 32)} steps of 32" in log, log
    log = _plan(tmp_path / "base", SKIP_BENCHMARK="1", VQ_ONLY="1", VQ_SECONDS="180")  # no rows: the default rate
    assert f"VQ: {int(0.8 * 180 * 150.0 / 32)} steps of 32" in log, log


def test_the_plan_check_catches_a_bad_flag(monkeypatch):
    """The check above fails on what it guards against (one case per kind of program)."""
    bad = [["python", "train_unet.py", "--vqmodel", "vq", "--snr_gama", "5"],
           ["python", "-m", "adni_diffusers.cli", "generate", "--model", "m", "--out", "o", "--scheduler", "ddpn"],
           ["python", "benchmarks/run.py", "--variants", "ours, compile mode reduce overhead"],
           ["python", "benchmarks/offload_check.py", "--model", "m", "--num_images", "2"]]
    for words in bad:
        assert _argparse_verdict(words, monkeypatch), words
    assert _argparse_verdict(["python", "benchmarks/offload_check.py", "--model", "m"], monkeypatch) is None


def _ssim_scale(model: Path, tmp_path: Path) -> dict:
    """benchmarks/ssim_scale.py run on one model folder: its one result row."""
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "ssim_scale.py"), str(model), "--out",
                          str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [result] = json.loads(out.read_text())
    return result


def test_ssim_scale_reproduces_the_vq_metrics_and_the_old_scale(tiny_vq, tmp_path):
    """benchmarks/ssim_scale.py: its new-scale numbers are the VQModel's own metrics.json (same subset, same code),
    its old-scale ones what metrics.py computed before 2026-12-02 ([-1, 1], data_range 2)."""
    result = _ssim_scale(tiny_vq, tmp_path)
    saved = json.loads((tiny_vq / "metrics.json").read_text())
    new, old = result["[0, 1], data_range 1"], result["[-1, 1], data_range 2"]
    assert result["images"] == saved["eval_images"]
    assert abs(new["ssim"] - saved["ssim"]) < 1e-5 and abs(new["ms_ssim"] - saved["ms_ssim"]) < 1e-5
    assert abs(old["ssim"] - new["ssim"]) > 1e-4  # the scales do differ on these reconstructions


def test_ssim_scale_holds_out_the_patients_of_the_split_seed(tiny_vq, tmp_path):
    """A VQModel trained with --split_seed other than --seed: ssim_scale drew its held-out patients with --seed, so
    it measured training patients and its numbers were not the model's metrics.json."""
    import shutil

    model = tmp_path / "vq"
    shutil.copytree(tiny_vq, model)
    args = json.loads((model / "training_args.json").read_text())
    args.update(split_seed=args["seed"], seed=args["seed"] + 3)  # the same held-out patients, another --seed
    (model / "training_args.json").write_text(json.dumps(args))
    saved = json.loads((model / "metrics.json").read_text())
    assert abs(_ssim_scale(model, tmp_path)["[0, 1], data_range 1"]["ssim"] - saved["ssim"]) < 1e-5


def test_the_vq_compile_probe_runs_the_steps_own_loss(tmp_path, monkeypatch):
    """The VQ rows' compile probe backpropagates the step's loss, codebook terms included, as train_vqmodel's
    does: it ran the reconstruction loss alone, which gives the codebook no gradient (another backward than the
    step's, so a compile failure of the step's could pass the probe). Run here eagerly."""
    from adni_diffusers import training

    codebook_grads = []

    def run_probe(model, args, probe=None, child_probe=None):
        probe(model)
        codebook_grads.append(model.vq.quantize.embedding.weight.grad)
        model.zero_grad(set_to_none=True)
        return model

    monkeypatch.setattr(training, "maybe_compile", run_probe)
    run = _load_benchmark_script()
    run.main(["--smoke", "--device", "cpu", "--sections", "vq", "--compile", "--variants", "ours + compile",
              "--vq-batch-sizes", "2", "--out", str(tmp_path / "r.json")])
    assert codebook_grads and all(g is not None and g.abs().sum() > 0 for g in codebook_grads)


def test_conv_layouts_records_what_each_convolution_backward_gets():
    """benchmarks/conv_layouts.py (the GPU session's diagnosis of the layout copies) runs and counts every
    convolution backward of the step, with its layouts and dtypes; NNPACK (NCHW only, picked by aten's CPU
    convolution from batch 16 on) is off, so at batch 16 the eager channels_last step keeps channels_last."""
    layouts = _load_benchmark_script(REPO_ROOT / "benchmarks" / "conv_layouts.py", "conv_layouts")
    result = layouts.main(["--preset", "tiny", "--how", "eager", "--batch-size", "16", "--size", "8", "--bf16"])
    assert result["calls"] > 0 and result["nnpack"] is False and result["bf16"] is True
    assert sum(result["layouts (gradient, input, weight)"].values()) == result["calls"]
    assert sum(result["dtypes (gradient, input, weight)"].values()) == result["calls"]
    assert "bfloat16, bfloat16, bfloat16" in result["dtypes (gradient, input, weight)"]
    assert result["nchw_weights"] == 0 and result["all_channels_last"] > result["calls"] // 2


def test_the_example_style_loader_does_not_pin_memory():
    """diffusers' train_unconditional builds its DataLoader without pin_memory (Accelerate keeps it so), and with
    no worker the copy into pinned memory falls on the step's critical path: the example-style rows pinned on CUDA.
    A bench that says CUDA (with CPU tensors) shows the loader the CUDA rows get."""
    from types import SimpleNamespace

    import torch

    from adni_diffusers.data import SliceDataset

    run = _load_benchmark_script()
    cuda = SimpleNamespace(cuda=True, device=torch.device("cpu"))
    loader = run.make_loader(SliceDataset(run.random_slices(4)), 2, cuda, package=False)
    assert loader.pin_memory is False


def test_the_ablation_rows_vary_only_what_they_name_in_the_optimizer(smoke):
    """The non-fused UNet rows ("cached latents, fp32, eager" ... "+ channels_last", on CPU the "ours" row) took
    torch's AdamW defaults (weight_decay 0.01), make_optimizer takes --adam_weight_decay 0: "+ fused AdamW" varied
    the weight decay too. Now only `fused` differs; the example style keeps plain AdamW."""
    results, _ = smoke
    settings = {r["variant"]: r["optimizer_settings"] for r in results["unet"]["rows"]}
    ours = {k: v for k, v in settings.items() if k != "example style"}
    assert ours and all(s["weight_decay"] == 0.0 and s["eps"] == 1e-8 and list(s["betas"]) == [0.9, 0.999]
                        for s in ours.values()), ours
    assert settings["example style"]["weight_decay"] == 0.01  # torch.optim.AdamW's default, as before


def test_the_tf32_rate_is_measured_as_the_bf16_rate_is():
    """The TF32 rate (the fp32 rows' MFU denominator on CUDA) was one timed block after one warm-up product; a slow
    block made every fp32 row's MFU too high. Now: 3 warm-up products and the best of `repeats` blocks, as bf16.
    A bench that says CUDA, on CPU tensors (bf16 and fp32 matmuls run there too)."""
    from types import SimpleNamespace

    import torch

    run = _load_benchmark_script()
    cuda = SimpleNamespace(cuda=True, device=torch.device("cpu"), sync=lambda: None)
    out = run.matmul_rate(cuda, 32, repeats=3)
    assert out["dtype"] == "bfloat16" and len(out["seconds_per_block"]) == 3
    assert len(out["tf32_seconds_per_block"]) == 3 and _positive(out["tf32_tflops"])
    # (the blocks are recorded to the microsecond: at a CPU's 1e-4 s a block, rounding alone moved them 0.4%)
    assert out["tf32_tflops"] * 1e12 >= 2 * 32**3 * out["iters"] / (max(out["tf32_seconds_per_block"]) + 5e-7)


def test_each_compiled_sampling_row_compiles_for_itself(monkeypatch, tmp_path):
    """A compilation shared by the sampler rows of one batch size kept the earlier rows' CUDA graph pools (mode
    reduce-overhead) allocated inside the later rows' peak memory: each row now starts from a fresh compile state.
    The compile itself is left out here (a CPU compile of both models takes minutes)."""
    import torch

    run = _load_benchmark_script()
    resets = []
    monkeypatch.setattr(run, "fresh_compile_cache", lambda: resets.append(1))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    results = run.main(["--smoke", "--device", "cpu", "--sections", "sampling", "--sampling-paths", "pipeline",
                        "--compile", "--compile-mode", "reduce-overhead", "--out", str(tmp_path / "r.json")])
    rows = results["sampling"]["rows"]
    assert len(rows) == 6 and not any("error" in r for r in rows)  # 3 samplers, eager and "compiled"
    assert len(resets) == len(rows)
    resets.clear()  # without CUDA graphs the rows of one batch size share their compile (once per batch size)
    run.main(["--smoke", "--device", "cpu", "--sections", "sampling", "--sampling-paths", "pipeline", "--compile",
              "--out", str(tmp_path / "d.json")])
    assert len(resets) == 2


def test_generate_rows_time_what_the_generate_command_runs(smoke):
    """The sampling goals were timed on the pipeline called with one device generator, unconditional, images left
    on the device. `adni-diffusers generate` draws each image's noise from its own CPU generator, writes a PNG per
    image and, with --class on a conditional model, guides (the UNet runs on twice the batch): those rows now time
    `generate.generate` itself, and the pipeline rows say what they are."""
    results, table = smoke
    rows = results["sampling"]["rows"]
    assert all(r["name"].startswith("pipeline call (one device generator, unconditional, no PNG)")
               for r in rows if r["path"] == "pipeline call")
    generated = [r for r in rows if r["path"] == "generate"]
    assert {(r["sampler"], r["conditional"]) for r in generated} == {
        (s, c) for s in ("ddpm", "dpm++", "unipc") for c in (False, True)}
    flops, rate = results["flops"], results["matmul"]["flops_per_s"]
    for r in generated:
        assert "error" not in r and _positive(r["images_per_s"]), r
        assert r["pngs_per_call"] == r["batch_size"] == 2  # one PNG per image, written by generate
        assert r["guidance"] == (2.0 if r["conditional"] else 1.0)
        assert r["unet_passes_per_image_step"] == (2 if r["conditional"] else 1)
        assert r["mfu"] == pytest.approx(r["images_per_s"] * (
            r["steps"] * r["unet_passes_per_image_step"] * flops["unet_forward_per_image"]
            + flops["vq_decode_per_image"]) / rate)
    assert "what `adni-diffusers generate` runs" in table


def test_ours_is_never_a_row_train_unet_cannot_run():
    """"Ours" was the fastest of every no-EMA DataLoader row, the forced-layout experiments too (no train_unet flag
    sets inductor's layout optimization): now only rows train_unet can run, and the chosen row is recorded."""
    run = _load_benchmark_script()

    def row(variant, images_per_s, batch=256):
        return {"name": variant, "variant": variant, "batch_size": batch, "images_per_s": images_per_s,
                "config": dict(run.UNET_VARIANTS[variant]), "mfu": 0.3}

    rows = [row("example style", 600), row("ours, compile mode reduce-overhead", 4600),
            row("reduce-overhead + inductor layout optimization", 5000),
            row("ours + inductor layout optimization", 4900, batch=512)]
    summary = run.unet_summary(rows, [256, 512])
    assert summary["best_ours_variant"] == "ours, compile mode reduce-overhead" and summary["best_ours_batch"] == 256
    assert summary["best_ours_images_per_s"] == 4600 and summary["speedup"] == pytest.approx(4600 / 600)
    assert summary["speedup_by_batch"] == {"256": pytest.approx(4600 / 600)}  # batch 512 holds an experiment only
    opts = SimpleNamespace(preset="base", vq_preset="base", smoke=False, cpu_goal_presets=[])
    goals = {g["goal"]: g for g in run.evaluate_goals({"unet": {"summary": summary}}, opts, SimpleNamespace(cuda=True))}
    assert goals["unet_images_per_s"]["measured"] == 4600
    assert goals["unet_images_per_s"]["measured_on"] == 'row "ours, compile mode reduce-overhead", batch 256'
    # on CPU without --compile, "ours" at the later batch sizes is train_unet's defaults: no --channels_last
    cpu = SimpleNamespace(cuda=False)
    assert run.unet_variant_names(cpu, False, False) == ["example style", "cached latents, fp32, eager",
                                                         "ours + --latents_on_device"]


def _bench_main(run, tmp_path, *flags):
    return run.main(["--smoke", "--device", "cpu", *flags, "--out", str(tmp_path / "r.json")])


def test_an_mfu_above_100_percent_is_reported_invalid(monkeypatch, tmp_path):
    """A loaded CPU measured 70 GFLOP/s once, at the start, and a row then showed 104% MFU. The rate is now measured
    at the start and at the end (the higher kept, every row's MFU worked out against it), on CPU at three sizes,
    and an MFU above 100% is not printed as a result."""
    run = _load_benchmark_script()
    assert run.matmul_sizes(1024, cuda=False) == [512, 1024, 2048] and run.matmul_sizes(8192, cuda=True) == [8192]
    slow, fast = {"flops_per_s": 1e3}, {"flops_per_s": 1e12}  # the machine busy at the start, quiet at the end
    rates = iter([slow, fast])
    monkeypatch.setattr(run, "matmul_rate", lambda bench, n, repeats=3, sizes=None: dict(
        next(rates), dtype="float32", size=n, tflops=0.0, sizes_tried={}))
    results = _bench_main(run, tmp_path, "--sections", "unet", "--variants", "cached latents, fp32, eager")
    assert results["matmul"]["kept"] == "end" and results["matmul"]["flops_per_s"] == 1e12
    [row] = results["unet"]["rows"]
    assert row["mfu"] == pytest.approx(row["images_per_s"] * row["flops_per_image"] / 1e12)
    assert "mfu_invalid" not in row
    rates = iter([slow, slow])  # busy throughout: every MFU above 100%
    results = _bench_main(run, tmp_path, "--sections", "unet", "--variants", "cached latents, fp32, eager")
    [row] = results["unet"]["rows"]
    assert row["mfu"] is None and "under-measured" in row["mfu_invalid"]
    assert results["unet"]["summary"]["best_ours_mfu"] is None
    assert "invalid (> 100%: peak under-measured)" in run.markdown(results)


def test_smoke_records_both_rate_measurements(smoke):
    results, table = smoke
    m = results["matmul"]
    assert m["kept"] in ("start", "end") and len(m["sizes_tried"]) == 3
    assert m["flops_per_s"] == max(m["start"]["flops_per_s"], m["end"]["flops_per_s"])
    assert "the higher of the start" in table


def test_cpu_rows_are_repeated_and_record_the_load(smoke):
    """CPU rows were one block each (no spread), yet differences of 13-26% were read from them: 3 repeats now,
    and every row records the 1-minute load average around it."""
    run = _load_benchmark_script()
    cpu = run.parse_args(["--device", "cpu"])
    assert cpu.repeats == 3 and cpu.sample_repeats == 3
    results, table = smoke
    rows = [r for s in ("unet", "latent_cache", "vq", "sampling") for r in results[s]["rows"]]
    rows += results["cpu_goal"]["rows"]
    assert rows and all(len(r["load_average_1min"]) == 2 and all(x >= 0 for x in r["load_average_1min"])
                        for r in rows)
    assert "| load |" in table


def test_compiled_training_rows_record_their_compile_time(monkeypatch, tmp_path):
    """The compile happens in maybe_compile's probe, before the timed steps: its seconds go in the row. Compiling
    is left out here (minutes on a CPU): maybe_compile records a time and returns the model."""
    from adni_diffusers import training

    def fake_compile(model, args, probe=None, child_probe=None):
        args.compile_seconds = {"first_step_here": 12.5}
        return model

    monkeypatch.setattr(training, "maybe_compile", fake_compile)
    run = _load_benchmark_script()
    results = _bench_main(run, tmp_path, "--sections", "unet", "vq", "--compile", "--variants",
                          "+ torch.compile (= ours)", "ours + compile")
    rows = results["unet"]["rows"] + results["vq"]["rows"]
    assert len(rows) == 2 and all(r["compile_seconds"] == {"first_step_here": 12.5} for r in rows)
    assert "| compile s |" in run.markdown(results) and "| 12.5 |" in run.markdown(results)


def test_the_cpu_goal_is_judged_on_the_base_preset():
    """The CPU goal row timed the `small` pipeline (1.1M parameters), not the `base` models the product trains."""
    run = _load_benchmark_script()
    assert run.parse_args(["--device", "cpu"]).cpu_goal_presets == ["small", "base"]
    assert run.parse_args(["--smoke", "--device", "cpu"]).cpu_goal_presets == ["tiny"]

    def goal(rows, presets):
        opts = SimpleNamespace(preset="small", vq_preset="small", smoke=False, cpu_goal_presets=presets)
        return next(g for g in run.evaluate_goals({"cpu_goal": {"rows": rows}}, opts, SimpleNamespace(cuda=False))
                    if g["goal"] == "cpu_4_images_25_steps_s")

    small = {"preset": "small", "goal_configuration": False, "load_and_sample_seconds": 1.5}
    base = {"preset": "base", "goal_configuration": True, "load_and_sample_seconds": 41.9}
    g = goal([small, base], ["small", "base"])
    assert g["measured"] == 41.9 and g["measured_on"] == "base preset" and g["status"] == "met"
    g = goal([small], ["small"])
    assert g["measured"] is None and "base preset" in g["status"]
