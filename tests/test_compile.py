"""--compile / --compile_mode / --cudnn_benchmark: the compiled training path and its fallbacks (CPU)."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_UNET_ARGS, run_training_script


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


def test_cuda_error_in_probe_stops_with_advice():
    from adni_diffusers.training import TrainingError, maybe_compile

    def probe(m):
        raise RuntimeError("CUDA error: misaligned address\nCUDA kernel errors might be asynchronously reported")

    with pytest.raises(TrainingError, match=r"batch size 512 hit a CUDA error \(CUDA error: misaligned address\)"
                                            r".*Rerun without --compile"):
        maybe_compile(_tiny_model(), _args(train_batch_size=512), probe=probe)


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
def test_compiled_training_run_matches_eager(tmp_path, tiny_vq, demo_root, caplog):
    """The real train_unet path with --compile (inductor's CPU backend here): the probe compiles, training
    runs compiled, and the trained weights agree with an eager run of the same seed."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--max_train_steps", "2",
              "--latent_cache_dir", tmp_path / "cache", "--cudnn_benchmark", *TINY_UNET_ARGS,
              "--num_sample_images", "1", "--save_images_epochs", "100"]
    run_training_script("train_unet", [*common, "--output_dir", tmp_path / "eager"])
    with caplog.at_level(logging.WARNING):
        run_training_script("train_unet", [*common, "--output_dir", tmp_path / "compiled", "--compile",
                                           "--compile_mode", "reduce-overhead"])
    assert "torch.compile failed" not in caplog.text  # it really trained compiled
    eager = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "eager").unet.state_dict()
    compiled = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "compiled").unet.state_dict()
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)
    assert json.loads((tmp_path / "compiled" / "training_args.json").read_text())["compile_mode"] == "reduce-overhead"
