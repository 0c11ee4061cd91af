"""ADNILatentDiffusionPipeline: sampling, refinement, schedulers, labels, image-to-image, saving and loading."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, UNet2DModel,
                       UniPCMultistepScheduler, VQModel)

from adni_diffusers import ADNILatentDiffusionPipeline
from adni_diffusers.pipeline_adni_ldm import (PIPELINE_MODULE, nearest_codes, pipeline_module_name, prepare_slices,
                                                quantize_latents, renoise, to_slice_size)
from adni_diffusers.presets import unet_config, vq_config

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]


def make_pipe(conditional: bool = True, seed: int = 0, scheduler=None) -> ADNILatentDiffusionPipeline:
    """Randomly initialised tiny components: fast, and enough to test the plumbing. `scheduler`: the forward
    process the model is taken to have been trained with (default: make_noise_scheduler's, the seed's)."""
    torch.manual_seed(seed)
    vq = VQModel(**vq_config("tiny"))
    vq.register_to_config(scaling_factor=1.7)
    config = unet_config("tiny")
    if conditional:
        config["num_class_embeds"] = 3
    # beta_start/beta_end given, as make_noise_scheduler gives them: diffusers' from_config leaves values a
    # scheduler was built with by default to the next class's own defaults (Heun's beta_start is 0.00085)
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                           beta_end=0.02, clip_sample=False)
    pipe = ADNILatentDiffusionPipeline(vq, UNet2DModel(**config), scheduler, ["AD", "NC"] if conditional else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class UNetSpy:
    """Counts UNet calls and records the batch sizes and labels it sees."""

    def __init__(self, unet):
        self.calls, self.labels, self.batch = 0, [], []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        self.batch.append(args[0].shape[0])
        self.labels.append(kwargs.get("class_labels"))

    def remove(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------ math


def test_renoise_has_forward_process_statistics():
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: mean and std per timestep."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    abar = scheduler.alphas_cumprod
    x0 = torch.full((20000, 4), 0.8)
    g = torch.Generator().manual_seed(0)
    for t in (10, 300, 970):
        xt = renoise(x0, abar[t], torch.randn(x0.shape, generator=g))
        assert xt.mean().item() == pytest.approx(abar[t].sqrt().item() * 0.8, abs=0.01)
        assert xt.std().item() == pytest.approx((1 - abar[t]).sqrt().item(), rel=0.02)
    # it is exactly the scheduler's own forward process (what the UNet was trained on)
    noise = torch.randn(3, 4, 32, 32, generator=g)
    x0 = torch.randn(3, 4, 32, 32, generator=g)
    t = torch.tensor([5, 500, 999])
    assert torch.allclose(renoise(x0, abar[t], noise), scheduler.add_noise(x0, noise, t), atol=1e-6)


# --------------------------------------------------------------------------------------- sampling


def test_output_types(pipe):
    kw = dict(batch_size=2, num_inference_steps=2, generator=seeded())
    pil = pipe(**kw).images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.mode == "L" and im.size == (256, 256)
                                 for im in pil)
    arr = pipe(**kw, output_type="np").images
    assert arr.shape == (2, 256, 256, 1) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe(**kw, output_type="pt").images
    assert pt.shape == (2, 1, 256, 256)
    latents = pipe(**kw, output_type="latent").images
    assert latents.shape == (2, 4, 32, 32)
    assert pipe(**kw, return_dict=False)[0][0].size == (256, 256)
    with pytest.raises(ValueError, match="output_type"):
        pipe(**kw, output_type="jpeg")
    for wrong in ("numpy", "PT", "latent"):  # decode() gave PIL images for any of these
        with pytest.raises(ValueError, match=f"output_type='{wrong}': expected 'pt', 'np' or 'pil'"):
            pipe.decode(latents, output_type=wrong)
    assert pipe.decode(latents, output_type="np").shape == (2, 256, 256, 1)


def test_decode_takes_numpy_latents_and_names_a_wrong_shape(pipe):
    """A numpy array (a saved `output_type="latent"` result) had ended in "'numpy.ndarray' object has no attribute
    'float'", and one latent without its batch axis deep inside a convolution."""
    latents = pipe(batch_size=2, num_inference_steps=2, generator=seeded(), output_type="latent").images
    torch.testing.assert_close(pipe.decode(latents.numpy()), pipe.decode(latents))
    with pytest.raises(ValueError, match=r"latents has shape \(4, 32, 32\); expected \(batch, 4, 32, 32\)"):
        pipe.decode(latents[0])
    with pytest.raises(ValueError, match="latents is a list: expected a tensor or numpy array"):
        pipe.decode(list(latents))


def test_same_generator_same_images_different_seed_different(pipe):
    a = pipe(batch_size=2, num_inference_steps=4, generator=seeded(1), output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=4, generator=seeded(1), output_type="np").images
    c = pipe(batch_size=2, num_inference_steps=4, generator=seeded(2), output_type="np").images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_schedulers_with_refinement(pipe, scheduler_cls):
    """Each scheduler samples, refines (state reset between passes) and is reproducible."""
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        spy = UNetSpy(pipe.unet)
        kw = dict(batch_size=2, num_inference_steps=6, refine_steps=3, refine_repeats=2, output_type="np")
        a = pipe(**kw, generator=seeded(3)).images
        spy.remove()
        b = pipe(**kw, generator=seeded(3)).images
    finally:
        pipe.scheduler = original
    assert spy.calls == 6 + 2 * 3  # the main loop, then each refinement pass over the last 3 timesteps
    assert np.isfinite(a).all() and np.array_equal(a, b)


def test_refinement_re_noises_to_the_right_level(pipe, monkeypatch):
    """Each pass re-noises the clean latent with the forward process to the refine_steps-th last timestep."""
    import adni_diffusers.pipeline_adni_ldm as module

    calls, timesteps, after_step = [], [], []

    def spy_renoise(x0, abar, noise):
        calls.append((abar, x0.clone()))
        return renoise(x0, abar, noise)

    def callback(p, step, t, tensors):
        timesteps.append(int(t))
        after_step.append(tensors["latents"].clone())
        return {}

    monkeypatch.setattr(module, "renoise", spy_renoise)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    try:
        pipe(batch_size=1, num_inference_steps=10, refine_steps=4, refine_repeats=2, generator=seeded(),
             callback_on_step_end=callback, output_type="latent")
    finally:
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    main, r1, r2 = timesteps[:10], timesteps[10:14], timesteps[14:]
    assert r1 == r2 == main[-4:]
    acp = pipe.scheduler.alphas_cumprod
    assert [abar for abar, _ in calls] == [pytest.approx(float(acp[main[-4]]))] * 2
    # pass 1 starts from the main loop's final (clean) latent, pass 2 from pass 1's
    assert torch.equal(calls[0][1], after_step[9]) and torch.equal(calls[1][1], after_step[13])


def test_callback_sees_every_step_and_can_change_latents(pipe):
    seen = []

    def callback(p, step, t, tensors):
        seen.append((step, set(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 4 else {}

    out = pipe(batch_size=1, num_inference_steps=5, refine_steps=2, refine_repeats=1, generator=seeded(),
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "x0_pred"],
               output_type="latent").images
    assert [s for s, _ in seen] == list(range(7))
    assert all(keys == {"latents", "x0_pred"} for _, keys in seen)
    with pytest.raises(ValueError, match="callback tensor input"):
        pipe(num_inference_steps=1, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])
    assert out.shape == (1, 4, 32, 32)


def test_a_callback_that_returns_latents_of_another_shape_or_no_dict_is_named(pipe):
    """`{"latents": x}` of another shape went on sampling at that size (16x16 latents came out as 128x128 pictures,
    not the 256x256 of this model); a callback returning no dict failed with "'int' object has no attribute 'get'"."""
    kwargs = dict(num_inference_steps=2, class_labels="AD", output_type="pt")
    with pytest.raises(ValueError, match=r"callback_on_step_end returned latents of shape \(1, 4, 16, 16\) at step "
                                         r"0; expected \(1, 4, 32, 32\)"):
        pipe(**kwargs, callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros(1, 4, 16, 16)})
    with pytest.raises(ValueError, match=r"callback_on_step_end returned a int at step 0: expected a dict"):
        pipe(**kwargs, callback_on_step_end=lambda p, i, t, k: 5)
    # None, {}, the tensors back, and latents of the right shape in another dtype (kept float32) are all fine
    for result in (None, {}, {"latents": torch.zeros(1, 4, 32, 32, dtype=torch.float16)}):
        assert pipe(**kwargs, callback_on_step_end=lambda p, i, t, k: result).images.shape == (1, 1, 256, 256)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="refine_steps"):
        pipe(num_inference_steps=5, refine_steps=6, refine_repeats=1)
    with pytest.raises(ValueError, match="strength"):
        pipe(image=np.zeros((240, 256), np.uint8), strength=1.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        pipe(batch_size=0, num_inference_steps=1)


@pytest.mark.parametrize("generator", [0, [0], np.random.default_rng(0)])
def test_a_generator_that_is_no_torch_generator_is_named(pipe, generator):
    """A seed (or a numpy generator) given as `generator` failed deep in diffusers' randn_tensor with
    "AttributeError: 'int' object has no attribute 'device'"."""
    with pytest.raises(ValueError, match=r"generator.*expected a torch\.Generator.*manual_seed"):
        pipe(num_inference_steps=1, generator=generator)


def test_arguments_that_would_be_ignored_are_refused(pipe):
    """A generator list of another length than the batch, `latents` beside `image`, guidance without a class:
    each did nothing (or failed with an IndexError) before."""
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        pipe(batch_size=3, num_inference_steps=1, generator=[seeded(0), seeded(1)])
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        pipe(batch_size=1, num_inference_steps=1, generator=[seeded(0), seeded(1)])
    with pytest.raises(ValueError, match="not both"):
        pipe(image=np.zeros((240, 256), np.uint8), latents=torch.randn(1, 4, 32, 32), num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs class_labels"):
        pipe(num_inference_steps=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="this model is unconditional"):
        make_pipe(conditional=False)(num_inference_steps=1, guidance_scale=2.0)
    # refinement steps without a pass, a strength without an image: both did nothing
    with pytest.raises(ValueError, match=r"refine_steps=2 needs refine_repeats=1 or more"):
        pipe(num_inference_steps=4, refine_steps=2, refine_repeats=0)
    with pytest.raises(ValueError, match=r"strength=0.3 needs image"):
        pipe(num_inference_steps=1, strength=0.3)
    spy = UNetSpy(pipe.unet)
    try:  # image-to-image without a strength keeps its documented default, 0.5: 2 of 4 steps
        pipe(image=np.zeros((240, 256), np.uint8), num_inference_steps=4, output_type="latent")
    finally:
        spy.remove()
    assert spy.calls == 2
    # image-to-image makes one image per image, as `latents` one per latent: another batch_size was ignored
    with pytest.raises(ValueError, match="batch_size=3 but image holds 2"):
        pipe(image=np.zeros((2, 240, 256), np.uint8), batch_size=3, num_inference_steps=2)
    assert pipe(image=np.zeros((2, 240, 256), np.uint8), batch_size=2, num_inference_steps=2,
                output_type="latent").images.shape == (2, 4, 32, 32)
    # a refinement pass re-noised past the edit's own start (strength 0.25 of 8 steps runs 2): it changed the
    # image more than strength says
    with pytest.raises(ValueError, match=r"refine_steps=3 with image: strength=0.25 runs 2 of the 8 steps"):
        pipe(image=np.zeros((240, 256), np.uint8), strength=0.25, num_inference_steps=8, refine_steps=3,
             refine_repeats=1)
    spy = UNetSpy(pipe.unet)
    try:  # as many as the edit runs is fine: 2 + 2
        pipe(image=np.zeros((240, 256), np.uint8), strength=0.25, num_inference_steps=8, refine_steps=2,
             refine_repeats=1, output_type="latent")
    finally:
        spy.remove()
    assert spy.calls == 4


@pytest.mark.parametrize("name, value", [("num_inference_steps", 2.5), ("num_inference_steps", True),
                                         ("batch_size", 1.0), ("batch_size", True), ("refine_steps", 1.5),
                                         ("refine_repeats", 1.0), ("refine_steps", None)])
def test_counts_must_be_ints(pipe, name, value):
    """num_inference_steps=2.5: DDPM and DPM++ ran 3 steps, DDIM failed with an IndexError deep inside."""
    kwargs = dict(num_inference_steps=2, refine_steps=1, refine_repeats=1)
    with pytest.raises(ValueError, match=f"{name}={value!r}: expected an int"):
        pipe(**{**kwargs, name: value})
    pipe(**{**kwargs, name: np.int64(1)}, output_type="latent")  # numpy ints are ints


@pytest.mark.parametrize("name, value", [("guidance_scale", "2"), ("guidance_scale", True), ("eta", "0"),
                                         ("strength", "0.5"), ("guidance_scale", [2.0]), ("guidance_scale", None),
                                         ("eta", None), ("guidance_scale", torch.tensor([2.0]))])
def test_weights_must_be_numbers(pipe, name, value):
    """guidance_scale="2" (a value read from a config or a form) failed inside numpy: "ufunc 'isfinite' not
    supported for the input types"; now the parameter is named, as for the counts."""
    kwargs = dict(num_inference_steps=1, class_labels=0)
    if name == "strength":
        kwargs["image"] = np.zeros((240, 256), np.uint8)
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}: expected a number")):
        pipe(**{**kwargs, name: value})
    numbers = {"guidance_scale": np.int64(2), "strength": np.float32(0.5), "eta": np.float32(0)}  # numpy's are numbers
    pipe(**{**kwargs, name: numbers[name]}, output_type="latent")
    pipe(**{**kwargs, name: torch.tensor(float(numbers[name]))}, output_type="latent")  # and a 0-d tensor


def test_empty_images_and_numpy_latents_are_named(pipe):
    """`image=[]` and `encode([])` said "stack expects a non-empty TensorList"; numpy latents passed the shape
    check, then failed with an AttributeError."""
    with pytest.raises(ValueError, match="image is empty: expected at least one slice"):
        pipe(image=[], num_inference_steps=2)
    with pytest.raises(ValueError, match="images is empty: expected at least one slice"):
        pipe.encode([])
    with pytest.raises(ValueError, match="latents is a list: expected a tensor or numpy array"):
        pipe(latents=[[0.0]], num_inference_steps=1)
    start = torch.randn(2, 4, 32, 32, generator=seeded())
    kwargs = dict(num_inference_steps=2, output_type="latent")
    from_numpy = pipe(latents=start.numpy(), generator=seeded(), **kwargs).images  # DDPM draws noise each step
    torch.testing.assert_close(from_numpy, pipe(latents=start, generator=seeded(), **kwargs).images)


def test_every_sampler_starts_at_the_last_training_timestep():
    """A sampler starts from pure noise, so its first timestep must be t = 999 at any step count. diffusers'
    default "leading" spacing started DDIM-1 at t = 0 (it returned the noise), DDIM-2 at 500 and DPM-Solver++-500
    at 500. New models save "trailing"; `make_scheduler` also sets it for models saved with "leading"."""
    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.schedulers import SCHEDULERS as NAMES
    from adni_diffusers.schedulers import make_scheduler

    old_config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).config
    assert old_config.timestep_spacing == "leading"
    for config in (make_noise_scheduler().config, old_config):
        for name in NAMES:
            for steps in (1, 2, 10, 25, 500, 1000):
                scheduler = make_scheduler(name, config)
                scheduler.set_timesteps(steps)
                assert len(scheduler.timesteps) == steps and int(scheduler.timesteps[0]) == 999, (name, steps)
    # DDPM with all its steps runs t = 999 .. 0 either way: what the evaluation's DDPM-1000 figures sampled
    ddpm, leading = make_noise_scheduler(), DDPMScheduler(clip_sample=False)
    ddpm.set_timesteps(1000)
    leading.set_timesteps(1000)
    assert torch.equal(ddpm.timesteps, leading.timesteps)


def test_pndm_samples_but_is_refused_where_the_timesteps_are_sliced(pipe):
    """PNDM repeats its warm-up timesteps (10 steps give 19): image-to-image and refinement, which start part-way
    along them, made latents of std ~1000. They are refused; plain sampling works."""
    from diffusers import PNDMScheduler

    pndm = make_pipe()
    pndm.scheduler = PNDMScheduler.from_config(pndm.scheduler.config)
    assert torch.isfinite(pndm(num_inference_steps=10, class_labels=0, output_type="latent").images).all()
    with pytest.raises(ValueError, match="PNDMScheduler makes 19 timesteps for num_inference_steps=10"):
        pndm(image=np.zeros((240, 256), np.uint8), num_inference_steps=10, strength=0.3)
    with pytest.raises(ValueError, match="PNDMScheduler makes"):
        pndm(num_inference_steps=10, refine_steps=2, refine_repeats=1)


def record_schedulers_x0(scheduler) -> list[torch.Tensor]:
    """The scheduler's own x0 prediction at each step, appended to the returned list as it samples: DPM-Solver's
    `convert_model_output` (x0 is what the model output becomes), the others' `pred_original_sample`."""
    own = []
    if hasattr(scheduler, "convert_model_output"):
        convert = scheduler.convert_model_output

        def recording_convert(*args, **kwargs):
            x0 = convert(*args, **kwargs)
            own.append(x0.clone())
            return x0

        scheduler.convert_model_output = recording_convert
    else:
        step = scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            own.append(out.pred_original_sample.clone())
            return out

        scheduler.step = recording_step
    return own


@pytest.mark.parametrize("scheduler_name, prediction_type, options", [
    ("DDIMScheduler", "epsilon", {}), ("EulerDiscreteScheduler", "epsilon", {}),
    ("LMSDiscreteScheduler", "epsilon", {}), ("DDIMScheduler", "v_prediction", {}),
    ("EulerDiscreteScheduler", "epsilon", {"timestep_spacing": "linspace"}),  # fractional timesteps: 999, 749.25, ...
    ("DPMSolverMultistepScheduler", "epsilon", {"use_karras_sigmas": True}),  # sigmas between the integer timesteps'
    ("DDIMScheduler", "sample", {}),  # the model's output is x0 itself
    # fractional timesteps without one sigma per timestep: 846.14, ... (diffusers' KDPM2 passes tensors through
    # numpy at every step: 4,000 NumPy 2 deprecation warnings in the suite's summary, none of them ours)
    pytest.param("KDPM2DiscreteScheduler", "epsilon", {},
                 marks=pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")),
], ids=["ddim", "euler", "lms", "ddim-v", "euler-linspace", "dpm-karras", "ddim-sample", "kdpm2"])
def test_callback_x0_pred_is_the_schedulers_own(scheduler_name, prediction_type, options):
    """The callback's (and the GIF's) x0 prediction equals the scheduler's own at the same step
    (`pred_original_sample`; DPM-Solver's `convert_model_output`); for Euler-type schedulers, whose latents
    carry sqrt(sigma^2 + 1), it was off by that factor. For a v-prediction model it is sqrt(abar) x_t -
    sqrt(1 - abar) v: a sign slip there would preview another image. At a fractional timestep, or with Karras
    sigmas, abar is that of the scheduler's own sigma, not of the (rounded) timestep."""
    import diffusers

    pipe = make_pipe()  # a model trained with this prediction type
    pipe = make_pipe(scheduler=DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type))
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config, **options)
    steps = 5 if options else 4
    if "timestep_spacing" in options or scheduler_name.startswith("KDPM2"):
        pipe.scheduler.set_timesteps(steps)
        assert any(float(t) != int(t) for t in pipe.scheduler.timesteps)
    given, own = [], record_schedulers_x0(pipe.scheduler)
    pipe(num_inference_steps=steps, class_labels=0, guidance_scale=2.0, generator=seeded(), output_type="latent",
         callback_on_step_end=lambda p, i, t, tensors: given.append(tensors["x0_pred"].clone()) or {},
         callback_on_step_end_tensor_inputs=["latents", "x0_pred"])
    assert len(own) == len(given) == (2 * steps - 1 if scheduler_name.startswith("KDPM2") else steps)  # KDPM2: 2 per step
    for a, b in zip(given, own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_image_to_image_starts_at_the_solvers_own_noise_level(monkeypatch):
    """DPM-Solver++ with Karras sigmas steps from sigmas[k], which lies between the integer timesteps' noise
    levels (the timestep the UNet gets is its rounding). The encoded image is re-noised to that level, as
    diffusers' own `scheduler.add_noise` puts it after `set_begin_index`; abar of the rounded timestep was
    about 1% off. The refinement loop re-noises through the same level."""
    import adni_diffusers.pipeline_adni_ldm as module

    starts = []

    def recording_renoise(x0, abar, noise):
        out = renoise(x0, abar, noise)
        starts.append((x0, noise, out))
        return out

    monkeypatch.setattr(module, "renoise", recording_renoise)
    pipe = make_pipe()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe(image=np.full((240, 256), 90, np.uint8), strength=0.5, num_inference_steps=10, refine_steps=3,
         refine_repeats=1, generator=seeded(), output_type="latent")
    assert len(starts) == 2
    for (x0, noise, out), k in zip(starts, (5, 7)):
        own = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        own.set_timesteps(10)
        own.set_begin_index(k)
        t = own.timesteps[k]
        torch.testing.assert_close(out, own.add_noise(x0, noise, t.repeat(len(x0))), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, renoise(x0, float(own.alphas_cumprod[t]), noise), atol=1e-3)


def test_given_latents_set_the_batch_size(pipe, monkeypatch):
    """`latents=` of 3 images: 3 labels (6 rows under guidance), 3 refinement noises; a wrong shape is refused."""
    import adni_diffusers.pipeline_adni_ldm as module

    noise_shapes = []

    def spy_renoise(x0, abar, noise):
        noise_shapes.append(tuple(noise.shape))
        return renoise(x0, abar, noise)

    monkeypatch.setattr(module, "renoise", spy_renoise)
    latents = torch.randn(3, 4, 32, 32, generator=seeded(1))
    spy = UNetSpy(pipe.unet)
    try:
        out = pipe(latents=latents, class_labels="AD", guidance_scale=2.0, num_inference_steps=3, refine_steps=1,
                   refine_repeats=1, generator=seeded(), output_type="latent").images
    finally:
        spy.remove()
    assert out.shape == (3, 4, 32, 32)
    assert spy.batch == [6] * 4 and spy.labels[-1].tolist() == [0, 0, 0, 2, 2, 2]
    assert noise_shapes == [(3, 4, 32, 32)]  # fresh noise for each image, not one shared (1, 4, 32, 32)
    assert pipe(latents=latents, batch_size=3, num_inference_steps=1, output_type="latent").images.shape[0] == 3
    with pytest.raises(ValueError, match="batch_size=2 but latents holds 3"):
        pipe(latents=latents, batch_size=2, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"latents has shape \(2, 3, 8, 8\); expected \(batch, 4, 32, 32\)"):
        pipe(latents=torch.randn(2, 3, 8, 8), num_inference_steps=1)



def test_given_latents_are_scaled_like_drawn_noise_for_euler():
    """`latents=` is the starting noise: scaled by `init_noise_sigma` as the pipeline's own draw is (Euler: sigma_max,
    not 1), so the same noise given or drawn from the same seed gives the same sample."""
    from diffusers import EulerDiscreteScheduler

    pipe = make_pipe()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert float(pipe.scheduler.init_noise_sigma) > 1
    noise = torch.randn(1, 4, 32, 32, generator=seeded(3))
    drawn = pipe(num_inference_steps=3, generator=seeded(3), class_labels=0, output_type="latent").images
    given = pipe(num_inference_steps=3, latents=noise, class_labels=0, output_type="latent").images
    torch.testing.assert_close(given, drawn, rtol=1e-4, atol=1e-3)

def test_sequential_cpu_offload_decodes_and_encodes():
    """enable_sequential_cpu_offload keeps every weight on the meta device between forward calls (accelerate's
    `cpu_offload`, which diffusers puts on each model; here with the CPU as the execution device, where a GPU
    would be). Decoding read the codebook's meta weight and moved the latents to `vqvae.device` (meta): every
    output type but "latent" failed, and so did `encode`."""
    from accelerate import cpu_offload

    reference, offloaded = make_pipe(), make_pipe()
    for name in ("unet", "vqvae"):
        model = getattr(offloaded, name)
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert offloaded.vqvae.device.type == "meta" and offloaded.vqvae.quantize.embedding.weight.device.type == "meta"
    kw = dict(batch_size=2, class_labels="AD", guidance_scale=2.0, num_inference_steps=2, output_type="pt")
    torch.testing.assert_close(offloaded(generator=seeded(), **kw).images, reference(generator=seeded(), **kw).images)
    image = np.random.default_rng(0).integers(0, 256, (240, 256), dtype=np.uint8)
    torch.testing.assert_close(offloaded.encode(image), reference.encode(image))


def test_model_cpu_offload_runs_each_model_where_its_hook_puts_it():
    """enable_model_cpu_offload without a GPU: accelerate's offload hook with execution_device "meta" stands in
    for "cuda" (it moves a model there only when the model runs). encode/decode must put their inputs and the
    codebook on that device, not on the CPU where the model waited. (No hook chain: meta weights cannot go
    back to the CPU.)"""
    from accelerate import cpu_offload_with_hook

    offloaded = make_pipe()  # its weights end up on meta: a pipeline of its own
    assert offloaded.model_cpu_offload_seq == "unet->vqvae"
    for name in offloaded.model_cpu_offload_seq.split("->"):
        cpu_offload_with_hook(getattr(offloaded, name), execution_device="meta")
    assert offloaded._execution_device.type == "meta" and offloaded.vqvae.device.type == "cpu"
    images = offloaded(batch_size=2, class_labels="AD", guidance_scale=2.0, num_inference_steps=2,
                       generator=seeded(), output_type="pt").images
    assert images.device.type == "meta" and images.shape == (2, 1, 256, 256)
    assert offloaded.encode(np.zeros((240, 256), np.uint8)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------------------------- class labels


def test_class_labels_names_ints_and_guidance(pipe):
    spy = UNetSpy(pipe.unet)
    pipe(batch_size=2, class_labels=["AD", "NC"], num_inference_steps=1, generator=seeded())
    assert spy.labels[-1].tolist() == [0, 1] and spy.batch[-1] == 2
    pipe(batch_size=2, class_labels=1, num_inference_steps=1, generator=seeded())
    assert spy.labels[-1].tolist() == [1, 1]
    # classifier-free guidance: conditional and unconditional (null class 2) in one batch
    pipe(batch_size=2, class_labels="AD", guidance_scale=3.0, num_inference_steps=1, generator=seeded())
    assert spy.labels[-1].tolist() == [0, 0, 2, 2] and spy.batch[-1] == 4
    # a conditional model without labels samples its unconditional (dropped-label) class
    pipe(batch_size=2, num_inference_steps=1, generator=seeded())
    assert spy.labels[-1].tolist() == [2, 2]
    spy.remove()
    with pytest.raises(ValueError, match=r"unknown class label 'MCI'.*\['AD', 'NC'\]$"):
        pipe(class_labels="MCI", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"unknown class label 'ad'.*\(did you mean 'AD'\? class names are case-"):
        pipe(class_labels="ad", num_inference_steps=1)  # (a tool that lower-cased the names; --class ad)
    with pytest.raises(ValueError, match="out of range"):
        pipe(class_labels=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="3 class labels for batch_size=2"):
        pipe(batch_size=2, class_labels=["AD", "NC", "AD"], num_inference_steps=1)


def test_a_list_of_class_labels_without_batch_size_gives_one_image_per_label(pipe):
    """`pipe(class_labels=["AD", "NC", "AD"])` was refused ("3 class labels for batch_size=1"); diffusers' DiTPipeline
    makes one image per label, and so does this one now, labels in order."""
    spy = UNetSpy(pipe.unet)
    try:
        images = pipe(class_labels=["AD", "NC", "AD"], num_inference_steps=1, output_type="latent").images
        assert images.shape[0] == 3 and spy.labels[-1].tolist() == [0, 1, 0]
        assert pipe(class_labels=torch.tensor([1, 0]), num_inference_steps=1, output_type="latent").images.shape[0] == 2
        assert pipe(class_labels="NC", num_inference_steps=1, output_type="latent").images.shape[0] == 1
        assert pipe(class_labels=["NC"], num_inference_steps=1, output_type="latent").images.shape[0] == 1
    finally:
        spy.remove()


def test_a_pipeline_built_from_components_names_why_it_knows_no_class_names(pipe):
    """`ADNILatentDiffusionPipeline(**pipe.components)`: the class names are the pipeline's config, not a component,
    so they are not carried over; "this model knows []" sent the user looking at the model."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    bare = ADNILatentDiffusionPipeline(**pipe.components)
    with pytest.raises(ValueError, match=r"class label 'AD': this pipeline has no class names .*from_pipe\(pipe\), or "
                                         r"pass class_names=pipe.class_names\); or give the label's index 0..1"):
        bare(class_labels="AD", num_inference_steps=1, output_type="latent")
    assert bare(class_labels=0, num_inference_steps=1, output_type="latent").images.shape[0] == 1
    assert ADNILatentDiffusionPipeline.from_pipe(pipe).class_names == pipe.class_names == ["AD", "NC"]
    # the preprocessing is config too: from_pipe keeps a resized model's, where components alone fall back to pad
    resized = ADNILatentDiffusionPipeline(**pipe.components, class_names=pipe.class_names, preprocess="resize")
    assert ADNILatentDiffusionPipeline.from_pipe(resized).preprocess == "resize" and bare.preprocess == "pad"


def test_guidance_is_the_classifier_free_combination(pipe, monkeypatch):
    """eps = uncond + w (cond - uncond): w = 1 is the plain conditional pass, and another w changes the samples
    by exactly that combination (a pipeline that ignored guidance passed the label checks above)."""
    def latents(w):
        return pipe(batch_size=2, class_labels="AD", guidance_scale=w, num_inference_steps=2, generator=seeded(),
                    output_type="latent").images

    no_guidance = latents(1.0)
    conditional = pipe(batch_size=2, class_labels="AD", num_inference_steps=2, generator=seeded(),
                       output_type="latent").images
    torch.testing.assert_close(no_guidance, conditional)
    assert not torch.allclose(latents(3.0), no_guidance, atol=1e-4)
    # what the scheduler steps on is the combination of the UNet's two halves
    outputs, stepped = [], []
    real_forward, real_step = pipe.unet.forward, pipe.scheduler.step
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: outputs.append(real_forward(*a, **k).sample)
                        or real_forward(*a, **k))
    monkeypatch.setattr(pipe.scheduler, "step", lambda eps, *a, **k: stepped.append(eps) or real_step(eps, *a, **k))
    pipe(batch_size=1, class_labels="AD", guidance_scale=3.0, num_inference_steps=1, generator=seeded(),
         output_type="latent")
    cond, uncond = outputs[0].chunk(2)
    torch.testing.assert_close(stepped[0], uncond + 3.0 * (cond - uncond))


@pytest.mark.parametrize("label", [torch.tensor(1), np.array(1), np.int64(1), torch.tensor([1, 1]), "NC"],
                         ids=["0-d tensor", "0-d array", "numpy int", "tensor", "name"])
def test_one_label_in_any_form(pipe, label):
    spy = UNetSpy(pipe.unet)
    try:
        pipe(batch_size=2, class_labels=label, num_inference_steps=1, output_type="latent")
    finally:
        spy.remove()
    assert spy.labels[-1].tolist() == [1, 1]


def test_unconditional_model_rejects_labels():
    pipe = make_pipe(conditional=False)
    assert pipe(num_inference_steps=1, output_type="latent").images.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels="AD", num_inference_steps=1)
    # guidance: no advice to give class_labels, which the model refuses; null_class: None, not a TypeError
    with pytest.raises(ValueError, match="unconditional .*leave guidance_scale at 1.0") as refused:
        pipe(guidance_scale=2.0, num_inference_steps=1)
    assert "give class_labels" not in str(refused.value)
    assert pipe.null_class is None and make_pipe().null_class == 2


def test_a_scheduler_with_another_forward_process_is_refused(tmp_path):
    """A scheduler built by hand (`DDIMScheduler(clip_sample=False)`) or taken from another model falls back to
    diffusers' defaults: on a v-prediction model, prediction_type="epsilon" gave finite latents 70 times too large,
    decoded into meaningless slices without a word. The forward process the UNet learned is kept in
    model_index.json (`training_noise`), so a scheduler passed at loading is checked too."""
    from diffusers import EDMEulerScheduler

    trained = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            clip_sample=False, prediction_type="v_prediction")
    pipe = make_pipe(scheduler=trained)
    kwargs = dict(num_inference_steps=2, class_labels="AD", generator=seeded(), output_type="latent")
    pipe.scheduler = DDIMScheduler.from_config(trained.config)  # the saved settings: fine
    assert pipe(**kwargs).images.shape == (1, 4, 32, 32)
    pipe.scheduler = DDIMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match=r"DDIMScheduler has prediction_type='epsilon' \(trained with "
                                         r"'v_prediction'\).*`DDIMScheduler.from_config\(pipe.scheduler.config, "
                                         r"\*\*pipe.config.training_noise\)`"):
        pipe(**kwargs)
    # the advice, followed as it is written, mends it (`from_config(pipe.scheduler.config)` alone copied the wrong
    # scheduler's settings, and the same error came again)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **pipe.config.training_noise)
    assert pipe(**kwargs).images.shape == (1, 4, 32, 32)
    pipe.scheduler = DDIMScheduler.from_config(trained.config, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="beta_schedule='scaled_linear' \\(trained with 'linear'\\)"):
        pipe(**kwargs)
    pipe.scheduler = EDMEulerScheduler()  # in DDPMScheduler's `compatibles`: noise levels given as timesteps
    with pytest.raises(ValueError, match="EDMEulerScheduler has no alphas_cumprod"):
        pipe(**kwargs)

    pipe.scheduler = trained
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["training_noise"]["prediction_type"] == "v_prediction"
    loaded = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", scheduler=DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        loaded(**kwargs)
    remote = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True,
                                               scheduler=DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        remote(**kwargs)
    # saved before 2026-12-06 (no record): the scheduler it loads with is taken as the one it learned
    del index["training_noise"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    old = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert old.config.training_noise["prediction_type"] == "v_prediction"
    old.scheduler = DDIMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        old(**kwargs)
    # given another scheduler at loading: the saved scheduler's config says what the UNet learned, not the one given
    old = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", scheduler=DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        old(**kwargs)


@pytest.mark.parametrize("options, named", [(dict(timestep_type="continuous"), "timestep_type='continuous'"),
                                             (dict(use_flow_sigmas=True), "use_flow_sigmas=True")])
def test_a_scheduler_option_that_changes_the_timesteps_meaning_is_refused(options, named):
    """`EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_type="continuous")` gave the UNet
    0.25 log(sigma) (1.26 .. -0.21) as its timesteps, and `use_flow_sigmas=True` (DPM-Solver++, UniPC) a flow-matching
    noise schedule: both keep alphas_cumprod and the training settings, so they sampled without a word."""
    from diffusers import EulerDiscreteScheduler

    scheduler_cls = EulerDiscreteScheduler if "timestep_type" in options else DPMSolverMultistepScheduler
    pipe = make_pipe()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **options)
    with pytest.raises(ValueError, match=rf"{scheduler_cls.__name__} has {re.escape(named)}: .*0..999"):
        pipe(num_inference_steps=2, class_labels="AD", output_type="latent")
    refused = pipe.scheduler
    with pytest.raises(ValueError) as info:
        pipe(num_inference_steps=2, class_labels="AD", output_type="latent")
    advice = re.search(r"`(\w+)\.from_config\(pipe\.scheduler\.config, (\w+)=(.+?)\)`", str(info.value))
    # the advice, followed as written, mends it (from_config(pipe.scheduler.config) alone copies the option)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **{advice[2]: ast.literal_eval(advice[3])})
    assert advice[1] == scheduler_cls.__name__
    assert pipe(num_inference_steps=2, class_labels="AD", output_type="latent").images.shape == (1, 4, 32, 32)
    pipe.scheduler = DDIMScheduler.from_config(refused.config)  # which keeps the option in its config, unused
    assert pipe.scheduler.config.get(next(iter(options))) == next(iter(options.values()))
    assert pipe(num_inference_steps=2, class_labels="AD", output_type="latent").images.shape == (1, 4, 32, 32)


def test_a_forward_process_of_trained_betas_is_recorded_and_compared(tmp_path):
    """A scheduler with `trained_betas` as an array: the record held the array, so the comparison raised numpy's
    "truth value of an array is ambiguous" and model_index.json could not be written."""
    betas = np.linspace(1e-4, 0.02, 1000)
    pipe = make_pipe(scheduler=DDPMScheduler(trained_betas=betas, clip_sample=False))
    kwargs = dict(num_inference_steps=2, class_labels="AD", generator=seeded(), output_type="latent")
    assert pipe(**kwargs).images.shape == (1, 4, 32, 32)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.training_noise["trained_betas"] == pytest.approx(betas.tolist())
    assert loaded(**kwargs).images.shape == (1, 4, 32, 32)
    loaded.scheduler = DDPMScheduler(trained_betas=betas * 2, clip_sample=False)
    with pytest.raises(ValueError, match=r"trained_betas=\[1000 values, 0.0002 .. 0.04\] \(trained with \[1000 "
                                         r"values, 0.0001 .. 0.02\]\)"):
        loaded(**kwargs)


def test_a_diffusers_callback_object_gets_the_tensors_it_names(pipe):
    """diffusers' pipelines take the tensor inputs of a PipelineCallback / MultiPipelineCallbacks from the object
    (`callback.tensor_inputs`); here they were the argument's default, ["latents"], and a callback reading x0_pred
    failed with a KeyError."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    seen = []

    class Recorder(PipelineCallback):
        tensor_inputs = ["latents", "x0_pred"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return callback_kwargs

    pipe(num_inference_steps=2, class_labels="AD", generator=seeded(), output_type="latent",
         callback_on_step_end=Recorder())
    pipe(num_inference_steps=1, class_labels="AD", generator=seeded(), output_type="latent",
         callback_on_step_end=MultiPipelineCallbacks([Recorder()]))
    assert seen == [["latents", "x0_pred"]] * 3


# ---------------------------------------------------------------------------- image-to-image


def test_prepare_slices_pads_like_training(tmp_path):
    slice_ = np.full((240, 256), 200, np.uint8)
    x = prepare_slices(PIL.Image.fromarray(slice_))
    assert x.shape == (1, 1, 256, 256)
    assert (x[0, 0, :8] == -1).all() and (x[0, 0, -8:] == -1).all()
    assert torch.allclose(x[0, 0, 8:248], torch.tensor(200 / 127.5 - 1))
    from adni_diffusers.data import decode_slice

    # the same pixels as the training loader gives
    path = tmp_path / "slice.png"
    PIL.Image.fromarray(slice_).save(path)
    arr, _, _ = decode_slice(path)
    assert torch.allclose(x[0, 0], torch.from_numpy(arr).float() / 127.5 - 1)


def test_prepare_slices_same_pixels_in_every_form():
    """A slice as PIL, uint8 numpy, uint8 tensor (one or a batch), float in [0, 1] or [-1, 1]: one result."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 256, 256), dtype=np.uint8)
    pixels[:, :, 0] = 0  # a black border, as slices have (so [-1, 1] floats have negative values)
    expected = torch.from_numpy(pixels).float()[:, None] / 127.5 - 1
    forms = {
        "PIL": [PIL.Image.fromarray(p) for p in pixels],
        "uint8 array": pixels,
        "uint8 tensor": torch.from_numpy(pixels),
        "uint8 tensor (N, 1, H, W)": torch.from_numpy(pixels)[:, None],
        "float tensor in [0, 1]": torch.from_numpy(pixels).float() / 255,
        "float tensor in [-1, 1]": expected,
    }
    for name, images in forms.items():
        torch.testing.assert_close(prepare_slices(images), expected, atol=1e-6, rtol=0, msg=name)


def test_prepare_slices_errors():
    with pytest.raises(ValueError, match="200 wide x 200 high; expected 256 wide x 240 high"):
        prepare_slices(np.zeros((200, 200), np.uint8))
    with pytest.raises(ValueError, match="3 channels; expected 1"):
        prepare_slices(torch.zeros(2, 3, 256, 256))
    with pytest.raises(ValueError, match="colour RGB image; expected 8-bit greyscale"):
        rgb = np.zeros((240, 256, 3), np.uint8)
        rgb[..., 0] = 255
        prepare_slices(PIL.Image.fromarray(rgb))


@pytest.mark.parametrize("given", ["slice.jpeg", "as_path", "in_a_list"])
def test_prepare_slices_names_a_file_path_given_for_an_image(tmp_path, given):
    # a path string was read character by character ("image 0 has shape ()"), a Path raised "'PosixPath' object
    # is not iterable"; neither said that a path is not taken
    path = tmp_path / "002_S_0295_85.jpeg"
    images = {"slice.jpeg": str(path), "as_path": path, "in_a_list": [GREY, path]}[given]
    with pytest.raises(ValueError, match=r"image \d is a file path .*002_S_0295_85\.jpeg.*PIL\.Image\.open"):
        prepare_slices(images, name="image")


GREY = np.random.default_rng(0).integers(0, 256, (240, 256)).astype(np.uint8)  # an 8-bit slice


def test_prepare_slices_takes_a_channels_last_array_as_one_image(pipe):
    """An RGB read of a grey slice (240, 256, 3), or one image of `output_type="np"` (256, 256, 1), is one slice:
    it was taken for a stack along its first axis, 240 (256) slices 3 (1) pixels wide, which a "resize" model
    stretched to 256x256 without a word. A channels-last tensor row is refused by size."""
    one = prepare_slices(GREY)
    rgb = np.repeat(GREY[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((240, 256, 1), 255, np.uint8)], axis=-1)
    torch.testing.assert_close(prepare_slices(rgb), one)
    torch.testing.assert_close(prepare_slices(rgba), one)
    torch.testing.assert_close(prepare_slices([rgb, GREY[..., None]]), torch.cat([one, one]))
    sampled = pipe(num_inference_steps=1, generator=seeded(), output_type="np").images[0]
    assert sampled.shape == (256, 256, 1)
    for preprocess in ("pad", "resize"):
        torch.testing.assert_close(prepare_slices(sampled, preprocess=preprocess),
                                   prepare_slices(sampled[..., 0], preprocess=preprocess))
    assert pipe.encode(sampled).shape == (1, 4, 32, 32)
    tinted = rgb.copy()
    tinted[0, 0, 1] = 7
    with pytest.raises(ValueError, match=r"image 0 \(an array of shape \(240, 256, 3\)\) is a colour RGB image"):
        prepare_slices(tinted)
    for preprocess in ("resize", "pad"):  # (pad said "expected 256 wide x 240 high", which hid the cause)
        with pytest.raises(ValueError, match="image 0 is 1 wide x 256 high; expected a slice at least 32 pixels"):
            prepare_slices(torch.from_numpy(sampled), preprocess=preprocess)


def grey_palette() -> PIL.Image.Image:
    """GREY stored as palette indices (reversed, so the indices are not the grey levels) and a grey palette."""
    image = PIL.Image.fromarray(255 - GREY, mode="P")
    image.putpalette([255 - i for i in range(256) for _ in range(3)])
    return image


def coloured_palette() -> PIL.Image.Image:
    image = grey_palette()
    image.putpalette([255 - i if c or i != 40 else 0 for i in range(256) for c in range(3)])  # one level red-less
    return image


def transparent(image: PIL.Image.Image) -> PIL.Image.Image:
    image.putalpha(0)
    return image


@pytest.mark.parametrize("make, message", [
    (lambda: PIL.Image.fromarray(GREY.astype(np.uint16) * 257), "image 0 is a 16-bit image"),
    (lambda: PIL.Image.fromarray(GREY.astype(np.int32) * 16), "image 0 is a I-mode image"),
    (lambda: PIL.Image.fromarray(GREY.astype(np.float32) / 255), "image 0 is a F-mode image"),
    (lambda: coloured_palette(), r"image 0 is a colour P \(palette\) image"),
    (lambda: transparent(PIL.Image.fromarray(GREY).convert("LA")), "image 0 is a LA image with transparency"),
], ids=["16-bit", "32-bit", "float", "colour palette", "transparent"])
def test_prepare_slices_refuses_images_that_are_not_8_bit_greyscale(make, message):
    """As the training loader (data.decode_slice): convert("L") would clip 16-bit, 32-bit and float images
    (a 16-bit slice turns white, a [0, 1] float one black)."""
    with pytest.raises(ValueError, match=f"{message}; expected 8-bit greyscale"):
        prepare_slices(make())


def test_prepare_slices_names_the_file_and_takes_opaque_grey_rgba(tmp_path):
    path = tmp_path / "slice16.png"
    PIL.Image.fromarray(GREY.astype(np.uint16) * 257).save(path)
    with PIL.Image.open(path) as image, pytest.raises(ValueError, match="slice16.png"):
        prepare_slices([PIL.Image.fromarray(GREY), image])
    expected = prepare_slices(PIL.Image.fromarray(GREY))
    for mode in ("RGB", "RGBA", "LA"):  # grey and opaque: the same pixels as mode L
        assert torch.equal(prepare_slices(PIL.Image.fromarray(GREY).convert(mode)), expected), mode
    # a PNG optimiser may store a greyscale slice as palette indices: read through the palette (it was refused)
    assert torch.equal(prepare_slices(grey_palette()), expected)
    path = tmp_path / "palette.png"
    grey_palette().save(path)
    with PIL.Image.open(path) as image:
        assert image.mode == "P" and torch.equal(prepare_slices(image), expected)


@pytest.mark.parametrize("values", [
    GREY.astype(np.float32),  # np.asarray(image, dtype=float): 0..255
    torch.from_numpy(GREY.astype(np.float32)),
    GREY.astype(np.int64),
    np.full((240, 256), np.nan, np.float32),
], ids=["float array 0..255", "float tensor 0..255", "int64 0..255", "NaN"])
def test_prepare_slices_refuses_floats_outside_minus_one_to_one(values):
    with pytest.raises(ValueError, match=r"image 0 has \w+ values in .*expected floats in \[-1, 1\].* or uint8 0..255"):
        prepare_slices(values)


def test_float_slices_that_stray_past_the_ends_by_rounding_are_taken_and_clipped():
    """A resize or an interpolation of a [0, 1] slice gives white as 1.0000001 and black as -1e-7: refused as "values
    in [-1e-07, 1]" (the message's rounding hid the cause), and a [0, 1] slice a hair below 0 would have been read
    as a [-1, 1] one, far too dark. Within 1e-4 they are clipped; further out still refused, with enough digits."""
    rng = np.random.default_rng(0)
    unit = rng.random((240, 256)).astype(np.float32)
    unit[0, :2] = 0.0, 1.0
    expected = prepare_slices(unit)
    strayed = unit.copy()
    strayed[0, :2] = -1e-7, 1.0000001
    torch.testing.assert_close(prepare_slices(strayed), expected)
    torch.testing.assert_close(prepare_slices(unit * 2 - 1 + np.float32(2e-5) * (unit > 0.5)),
                               prepare_slices(np.clip(unit * 2 - 1 + np.float32(2e-5) * (unit > 0.5), -1, 1)))
    with pytest.raises(ValueError, match=r"values in \[0, 1\.01\]; expected floats in \[-1, 1\]"):
        prepare_slices(np.where(unit > 0.99, np.float32(1.01), unit))


def test_encode_decode_and_strength_zero_is_vq_reconstruction(pipe):
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (240, 256), dtype=np.uint8))
              for i in range(2)]
    latents = pipe.encode(images)
    assert latents.shape == (2, 4, 32, 32)
    reconstruction = pipe.decode(latents, output_type="np")
    out = pipe(image=images, strength=0.0, num_inference_steps=10, output_type="np").images
    assert np.allclose(out, reconstruction, atol=1e-6)
    # exactly the encoded latents, untouched (decoding snaps a slightly re-noised latent to the same codes)
    assert torch.equal(pipe(image=images, strength=0.0, num_inference_steps=10, output_type="latent").images, latents)
    # the latent cache and pipe.encode agree: one definition of "the latent of a slice"
    from adni_diffusers.latents import encode_all
    from adni_diffusers.data import SliceSet

    pixels = prepare_slices(images)
    slices = SliceSet(((pixels[:, 0] + 1) * 127.5).round().to(torch.uint8), torch.zeros(2, dtype=torch.long),
                      ["a", "b"], ["a", "b"])
    assert torch.allclose(encode_all(pipe.vqvae, slices, progress=False), latents, atol=1e-5)
    # the latents are the encoder's output times scaling_factor (1.7 here), and decoding divides it out again
    raw = pipe.vqvae.encode(pixels).latents
    torch.testing.assert_close(latents, raw * 1.7)
    from adni_diffusers.pipeline_adni_ldm import quantize_latents

    by_hand = pipe.vqvae.decode(quantize_latents(pipe.vqvae, raw)[0], force_not_quantize=True).sample.clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(latents, output_type="pt") * 2 - 1, by_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_image_to_image_with_each_scheduler(pipe, scheduler_cls):
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        spy = UNetSpy(pipe.unet)
        images = np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8)
        a = pipe(image=list(images), strength=0.5, num_inference_steps=8, class_labels="NC", generator=seeded(),
                 output_type="np").images
        spy.remove()
        b = pipe(image=list(images), strength=0.5, num_inference_steps=8, class_labels="NC", generator=seeded(),
                 output_type="np").images
    finally:
        pipe.scheduler = original
    assert a.shape == (3, 256, 256, 1) and np.array_equal(a, b)
    assert spy.calls == 4  # strength 0.5 of 8 steps


# --------------------------------------------------------------------------------- save / load


def test_save_writes_module_and_class_name_and_resave_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "a")
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    shipped = tmp_path / "a" / f"{PIPELINE_MODULE}.py"
    assert PIPELINE_MODULE == pipeline_module_name(shipped.read_bytes())  # named for its text
    assert index["_class_name"] == [PIPELINE_MODULE, "ADNILatentDiffusionPipeline"]
    assert index["class_names"] == {"AD": 0, "NC": 1}
    assert pipe.class_names == ["AD", "NC"]
    assert list((tmp_path / "a" / "unet").glob("*.safetensors"))

    loaded = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert type(loaded) is ADNILatentDiffusionPipeline
    loaded.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "model_index.json").read_text()) == index
    assert (tmp_path / "b" / shipped.name).read_bytes() == shipped.read_bytes()
    for name in ("unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    # a component given to from_pretrained replaces the saved one, as in diffusers (it was a TypeError)
    ddim = DDIMScheduler.from_pretrained(tmp_path / "a", subfolder="scheduler")
    swapped = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "a", scheduler=ddim, unet=loaded.unet)
    assert swapped.scheduler is ddim and swapped.unet is loaded.unet
    with pytest.raises(TypeError, match="unexpected arguments"):
        ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "a", text_encoder=None)


def test_saving_as_pickle_warns_that_adni_diffusers_will_not_load_it(pipe, tmp_path, monkeypatch):
    """`save_pretrained(..., safe_serialization=False)` wrote .bin pickles without a word, which `adni-diffusers
    generate`/`evaluate` then refuse (they load safetensors only) and others load only with diffusers' "unsafe
    serialization" warning. The save is diffusers' and goes ahead; a warning says so."""
    from adni_diffusers import pipeline_adni_ldm as module

    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)
    pipe.save_pretrained(tmp_path / "safe")
    assert warned == []
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert len(warned) == 1 and warned[0].startswith(f"{tmp_path / 'pickled'}: safe_serialization=False wrote the "
                                                     "weights as pickle (.bin)"), warned
    assert "adni-diffusers generate" in warned[0] and "safe_serialization=True" in warned[0]


def test_diffusion_pipeline_needs_trust_remote_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "ADNILatentDiffusionPipeline"


def _ship_other_version(saved, other):
    """A copy of a saved model whose pipeline file is another version's: its decoding raises."""
    shutil.copytree(saved, other)
    [shipped] = other.glob("pipeline_adni_ldm*.py")
    source = shipped.read_text() + '\n\ndef decode_latents(vqvae, latents):\n    raise RuntimeError("version b")\n'
    shipped.unlink()
    name = pipeline_module_name(source.encode())
    (other / f"{name}.py").write_text(source)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"][0] = name
    (other / "model_index.json").write_text(json.dumps(index))


def test_two_versions_of_the_remote_code_load_side_by_side(pipe, tmp_path):
    """diffusers imports a local folder's code as `diffusers_modules.local.<file name>` and re-runs a second
    file of the same name into the same module: with one file name for every version, loading a model saved by
    another version broke the first pipeline (its methods called the second file's functions)."""
    pipe.save_pretrained(tmp_path / "a")
    _ship_other_version(tmp_path / "a", tmp_path / "b")
    a = DiffusionPipeline.from_pretrained(tmp_path / "a", trust_remote_code=True)
    b = DiffusionPipeline.from_pretrained(tmp_path / "b", trust_remote_code=True)
    assert type(a).__module__ != type(b).__module__
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="version b"):
        b(batch_size=1, class_labels="AD", num_inference_steps=1, output_type="np")
    assert a(batch_size=1, class_labels="AD", num_inference_steps=1, output_type="np").images.shape == (1, 256, 256, 1)


def test_save_into_a_folder_of_another_version_leaves_one_pipeline_file(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "a")
    _ship_other_version(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "pipeline_adni_ldm.py").write_text("# the name every version used before 2026-12-03\n")
    (tmp_path / "b" / "pipeline_adni_ldm_notes.py").write_text("# not a shipped copy: kept\n")
    pipe.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("pipeline_adni_ldm*.py")) == [
        f"{PIPELINE_MODULE}.py", "pipeline_adni_ldm_notes.py"]
    remote = DiffusionPipeline.from_pretrained(tmp_path / "b", trust_remote_code=True)
    assert type(remote).__module__ == f"diffusers_modules.local.{PIPELINE_MODULE}"


@pytest.mark.slow
def test_loads_and_samples_where_package_is_not_installed(tiny_ldm, tmp_path):
    """A fresh interpreter in which `import adni_diffusers` fails, like a user's machine without it."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "adni_diffusers" or name.startswith("adni_diffusers."):
                    raise ImportError("adni_diffusers is not installed here")
        sys.meta_path.insert(0, Block())
        try:
            import adni_diffusers
            raise SystemExit("the package was importable")
        except ImportError:
            pass
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tiny_ldm)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, class_labels=["AD", "NC"], guidance_scale=2.0, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0)).images
        assert not any(m.startswith("adni_diffusers") for m in sys.modules), "package leaked in"
        print("OK", type(pipe).__module__, len(images), images[0].mode, images[0].size)
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OK diffusers_modules.local.{PIPELINE_MODULE} 2 L (256, 256)" in proc.stdout
    # diffusers scans the shipped file for imports: an optional `from adni_diffusers... import` read as a need
    # ("This modeling file might require ... Run `pip install adni_diffusers`") at every load
    assert "might require" not in proc.stderr, proc.stderr[-3000:]


def test_the_shipped_file_names_the_python_it_needs(tmp_path):
    """Python 3.9 failed on the file's first `str | None` annotation with a bare TypeError."""
    code = ("import sys; sys.version_info = (3, 9, 18, 'final', 0); sys.version = '3.9.18 (main)'\n"
            f"exec(compile(open({inspect.getsourcefile(renoise)!r}).read(), 'pipeline', 'exec'), {{'__name__': 'shipped'}})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ImportError: ADNILatentDiffusionPipeline needs Python >= 3.10; this is Python 3.9.18" in proc.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loading_and_fp16_variant(pipe, tmp_path, dtype):
    pipe.save_pretrained(tmp_path / "full")
    low = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full", dtype=dtype)
    assert low.unet.dtype == low.vqvae.dtype == dtype
    # `torch_dtype`, diffusers' older name for `dtype`, is a documented alias
    old_name = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full", torch_dtype=dtype)
    assert old_name.unet.dtype == old_name.vqvae.dtype == dtype
    low.set_progress_bar_config(disable=True)
    out = low(batch_size=1, class_labels="AD", guidance_scale=2.0, num_inference_steps=2, generator=seeded(),
              output_type="np").images
    assert np.isfinite(out).all()
    if dtype == torch.float16:
        low.save_pretrained(tmp_path / "variant", variant="fp16")
        assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
        again = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "variant", variant="fp16", dtype=dtype)
        assert again.unet.dtype == dtype
        remote = DiffusionPipeline.from_pretrained(tmp_path / "variant", variant="fp16", dtype=dtype,
                                                   trust_remote_code=True)
        assert remote.unet.dtype == dtype


def test_loading_takes_diffusers_per_component_dtypes_and_placement(pipe, tmp_path):
    """A dict of dtypes (diffusers' per-component form) was handed whole to each model, which logged "not a
    torch.dtype" and loaded float32: a bf16 UNet asked for came back float32. `low_cpu_mem_usage` and a one-device
    `device_map`, which DiffusionPipeline.from_pretrained takes, were refused."""
    pipe.save_pretrained(tmp_path / "full")
    mixed = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full",
                                                        dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert (mixed.unet.dtype, mixed.vqvae.dtype) == (torch.bfloat16, torch.float16)
    only_vq = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full", torch_dtype={"vqvae": torch.bfloat16})
    assert (only_vq.unet.dtype, only_vq.vqvae.dtype) == (torch.float32, torch.bfloat16)  # no "default": float32
    placed = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full", device_map="cpu", low_cpu_mem_usage=True)
    assert placed.device.type == "cpu"
    torch.testing.assert_close(placed.unet.state_dict(), pipe.unet.state_dict())
    with pytest.raises(ValueError, match="device_map='balanced'.*DiffusionPipeline.from_pretrained"):
        ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "full", device_map="balanced")


def _assert_prepared_as_the_loader_does(slice_, path, preprocess, loaded):
    """prepare_slices gives the training loader's pixels (`loaded`, uint8) for the file, the array and the tensor;
    floats are brought to size as floats: within the 8-bit result's rounding."""
    expected = torch.tensor(loaded).float() / 127.5 - 1
    with PIL.Image.open(path) as image:
        for form in (image, slice_, torch.from_numpy(slice_)):
            torch.testing.assert_close(prepare_slices(form, preprocess=preprocess)[0, 0], expected)
    as_float = prepare_slices(torch.from_numpy(slice_).float() / 127.5 - 1, preprocess=preprocess)[0, 0]
    assert (as_float - expected).abs().max() <= 0.5 / 127.5 + 1e-5


def test_prepare_slices_resizes_like_training_for_a_resize_model(tmp_path):
    """--preprocess resize (the seed's stretch): the same pixels as the training loader, in every form."""
    from adni_diffusers.data import decode_slice

    slice_ = np.random.default_rng(1).integers(0, 256, (240, 256)).astype(np.uint8)
    path = tmp_path / "slice.png"
    PIL.Image.fromarray(slice_).save(path)
    _assert_prepared_as_the_loader_does(slice_, path, "resize", decode_slice(path, "resize")[0])
    assert prepare_slices(np.zeros((200, 300), np.uint8), preprocess="resize").shape == (1, 1, 256, 256)
    with pytest.raises(ValueError, match="200 wide x 200 high.*--preprocess pad"):
        prepare_slices(np.zeros((200, 200), np.uint8))
    with pytest.raises(ValueError, match="preprocess='crop'"):
        prepare_slices(slice_, preprocess="crop")


def test_prepare_slices_fits_like_training_for_a_fit_model(tmp_path):
    """--preprocess fit (registered slices, 182x218 and the like): scaled to 256 on the longer side with the
    proportions kept, then padded with black on the other; the same pixels as the training loader. `resize`
    stretched such a slice 1.41x one way and 1.17x the other, with nothing but a log line."""
    from adni_diffusers.data import decode_slice

    slice_ = np.full((218, 182), 200, np.uint8)  # a bright block: where it lands shows the geometry
    slice_[0, 0] = 0  # (a float copy with a black pixel reads as [-1, 1], not [0, 1])
    path = tmp_path / "mni.png"
    PIL.Image.fromarray(slice_).save(path)
    arr, note, error = decode_slice(path, "fit")
    assert error is None and note == "scaled to fit from 182x218" and arr.shape == (256, 256)
    lit = np.argwhere(arr > 100)
    height, width = lit.max(0) - lit.min(0) + 1
    assert height == 256 and abs(width - round(182 * 256 / 218)) <= 1  # 214 wide: the proportions kept
    assert arr[:, :15].max() == 0 and arr[:, -15:].max() == 0  # black on both sides, evenly
    _assert_prepared_as_the_loader_does(slice_, path, "fit", arr)  # (floats: their black is -1)
    # ADNI's 256x240 is padded alone, as --preprocess pad makes it: no note
    adni = np.random.default_rng(3).integers(0, 256, (240, 256)).astype(np.uint8)
    PIL.Image.fromarray(adni).save(tmp_path / "adni.png")
    fitted, note, _ = decode_slice(tmp_path / "adni.png", "fit")
    assert note == "" and np.array_equal(fitted, decode_slice(tmp_path / "adni.png", "pad")[0])


@pytest.mark.parametrize("preprocess, size", [("pad", (256, 240)), ("fit", (182, 218)), ("fit", (200, 256)),
                                              ("resize", (182, 218))])
def test_slice_size_gives_images_back_in_the_training_slices_geometry(preprocess, size):
    """A model of 182x218 registered slices (fit) or of ADNI's 256x240 (pad) gave 256x256 only, the slice somewhere
    inside, and nothing said where. `slice_size` undoes the preprocessing's geometry: a slice prepared and given
    back is the slice again (exactly where nothing was scaled; to a few grey levels on a smooth slice otherwise)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    slice_ = (40 + 150 * (xx / w) * (yy / h) + 30).astype(np.uint8)  # smooth, and no black at its edges
    prepared = (prepare_slices(slice_, preprocess=preprocess) + 1) / 2  # (1, 1, 256, 256) in [0, 1], as decoded
    back = (to_slice_size(prepared, size, preprocess)[0, 0] * 255).round().numpy().astype(np.int16)
    assert back.shape == (h, w)
    scaled = preprocess == "resize" or (preprocess == "fit" and max(size) != 256)
    difference = np.abs(back - slice_.astype(np.int16))
    assert difference.max() <= (3 if scaled else 0), difference.max()
    assert back[:, 0].min() > 30 and back[:, -1].min() > 30 and back[0].min() > 30 and back[-1].min() > 30  # no border


def test_the_pipeline_gives_each_output_type_at_slice_size_and_refuses_sizes_it_cannot_give():
    base = make_pipe()
    fit = ADNILatentDiffusionPipeline(base.vqvae, base.unet, base.scheduler, ["AD", "NC"], preprocess="fit")
    kw = dict(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pt = fit(**kw, output_type="pt", slice_size=(182, 218)).images
    full = fit(**{**kw, "generator": torch.Generator().manual_seed(0)}, output_type="pt").images
    assert pt.shape == (2, 1, 218, 182)
    torch.testing.assert_close(pt, to_slice_size(full, (182, 218), "fit"))
    assert fit(**kw, output_type="np", slice_size=(182, 218)).images.shape == (2, 218, 182, 1)
    assert [im.size for im in fit(**kw, slice_size=(182, 218)).images] == [(182, 218)] * 2
    latents = fit(**kw, output_type="latent").images
    assert fit.decode(latents, slice_size=(182, 218)).shape == (2, 1, 218, 182)
    with pytest.raises(ValueError, match="slice_size is for images"):
        fit(**kw, output_type="latent", slice_size=(182, 218))
    with pytest.raises(ValueError, match=r"slice_size=\(182, 218\): this model's slices were padded.*\(256, 240\)"):
        base(**kw, slice_size=(182, 218))  # a pad model gives back 256-wide slices only
    with pytest.raises(ValueError, match=r"slice_size=\(182,\): expected \(width, height\)"):
        fit.decode(latents, slice_size=(182,))
    with pytest.raises(ValueError, match=r"slice_size=\(99999, 99999\): expected \(width, height\), two whole "
                                         r"numbers from 1 to 4096"):
        fit.decode(latents, slice_size=(99999, 99999))
    assert base(**kw, output_type="pt", slice_size=(256, 240)).images.shape == (2, 1, 240, 256)


def test_pipeline_prepares_slices_as_its_training_data_was(tmp_path):
    base = make_pipe()
    assert base.preprocess == "pad"
    pipe = ADNILatentDiffusionPipeline(base.vqvae, base.unet, base.scheduler, ["AD", "NC"], preprocess="resize")
    slice_ = np.random.default_rng(2).integers(0, 256, (240, 256)).astype(np.uint8)
    torch.testing.assert_close(pipe.encode(slice_), base.encode(prepare_slices(slice_, preprocess="resize")))
    assert not torch.allclose(pipe.encode(slice_), base.encode(slice_))  # padded, not stretched
    pipe.save_pretrained(tmp_path / "resize")
    assert json.loads((tmp_path / "resize" / "model_index.json").read_text())["preprocess"] == "resize"
    assert ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "resize").preprocess == "resize"
    assert DiffusionPipeline.from_pretrained(tmp_path / "resize", trust_remote_code=True).preprocess == "resize"
    # a pipeline saved before the setting was recorded pads, as every model then did
    index_path = tmp_path / "resize" / "model_index.json"
    index = json.loads(index_path.read_text())
    del index["preprocess"]
    index_path.write_text(json.dumps(index))
    assert ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "resize").preprocess == "pad"
    with pytest.raises(ValueError, match="preprocess='crop'"):
        ADNILatentDiffusionPipeline(base.vqvae, base.unet, base.scheduler, preprocess="crop")


def test_non_finite_guidance_is_refused_and_non_finite_latents_are_reported(pipe, monkeypatch):
    """NaN latents decode to a plausible-looking codebook pattern: a NaN guidance scale is refused, and NaN latents
    (a float16 overflow) are reported rather than passed off as samples."""
    import adni_diffusers.pipeline_adni_ldm as module

    with pytest.raises(ValueError, match="guidance_scale=nan: expected a finite number"):
        pipe(batch_size=1, class_labels="AD", guidance_scale=float("nan"), num_inference_steps=2)
    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)
    latents = torch.randn(3, 4, 32, 32, generator=seeded())
    pipe(latents=latents, class_labels="AD", num_inference_steps=2, output_type="np")
    assert warned == []
    latents[1, 0, 0, 0] = float("nan")
    pipe(latents=latents, class_labels="AD", num_inference_steps=2, output_type="np")
    assert len(warned) == 1 and warned[0].startswith("1 of 3 images have non-finite latents")
    # float32 weights: the advice is not float16's (it told a float32 run to try float32)
    assert "float16" not in warned[0] and "the guidance scale (here 1)" in warned[0], warned[0]


def test_a_model_with_nonfinite_weights_is_named_at_loading_and_its_nan_pictures_reported(pipe, tmp_path,
                                                                                          monkeypatch):
    """NaN in the VQModel's weights (a damaged file) made every sample NaN, saved as black pictures, with numpy's
    "invalid value encountered in cast" the only sign; `generate` and `evaluate` went on as if they were samples."""
    import adni_diffusers.pipeline_adni_ldm as module
    from adni_diffusers.generate import load_pipeline

    pipe.save_pretrained(tmp_path / "m")
    broken = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert module.nonfinite_weights(broken.vqvae) == module.nonfinite_weights(broken.unet) == []
    with torch.no_grad():
        broken.vqvae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    assert module.nonfinite_weights(broken.vqvae) == ["decoder.conv_out.weight"]
    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)
    broken.set_progress_bar_config(disable=True)
    broken(batch_size=2, class_labels="AD", num_inference_steps=2, generator=seeded(), output_type="np")
    assert len(warned) == 1 and warned[0].startswith("2 of 2 images decoded to non-finite pixels (NaN or inf) from "
                                                     "finite latents: the VQModel's weights hold NaN or inf")
    # counted per image: an image with NaN latents (the other warning's) does not hide one that decoded to NaN
    decode = module.decode_latents

    def nan_in_image_0(vqvae, latents):
        images = decode(vqvae, latents)
        images[0, 0, 0, 0] = float("nan")
        return images

    monkeypatch.setattr(module, "decode_latents", nan_in_image_0)
    latents = torch.randn(3, 4, 32, 32, generator=seeded())
    latents[1, 0, 0, 0] = float("nan")
    warned.clear()
    pipe(latents=latents, class_labels="AD", num_inference_steps=2, output_type="np")
    assert [w.split(":")[0] for w in warned] == ["1 of 3 images have non-finite latents (NaN or inf) after sampling",
                                                 "1 of 3 images decoded to non-finite pixels (NaN or inf) from finite "
                                                 "latents"]
    monkeypatch.setattr(module, "decode_latents", decode)
    broken.save_pretrained(tmp_path / "broken")
    warned.clear()
    ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "broken")
    assert warned == [f"{tmp_path / 'broken'}: vqvae holds NaN or inf in 1 weight tensors (decoder.conv_out.weight): "
                      "a damaged copy, or a run that diverged; its samples will not be pictures"]
    with pytest.raises(ValueError, match=r"--model .*broken: vqvae/ holds NaN or inf in 1 weight tensors "
                                         r"\(decoder.conv_out.weight\): a damaged copy"):
        load_pipeline(str(tmp_path / "broken"), "cpu", torch.float32)
    assert load_pipeline(str(tmp_path / "m"), "cpu", torch.float32).unet is not None
    # weights only as pickle (.bin): diffusers read them with a warning; the package's commands load safetensors only
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"--model .*pickled: .*pickled/vqvae holds its weights only as pickle "
                                         r"\(diffusion_pytorch_model.bin\), which can run code when loaded"):
        load_pipeline(str(tmp_path / "pickled"), "cpu", torch.float32)


def test_a_damaged_or_foreign_model_folder_is_named_before_diffusers_reads_it(pipe, tmp_path):
    """An empty model_index.json gave "Expecting value: line 1 column 1", an edited one (`{}`) KeyError: 'scheduler',
    a DDPMPipeline's "vqvae/config.json is missing (an incomplete copy?)", and weights cut short diffusers' "Unable to
    load weights", none naming what was wrong."""
    pipe.save_pretrained(tmp_path / "m")
    index = tmp_path / "m" / "model_index.json"
    original = index.read_text()
    load = ADNILatentDiffusionPipeline.from_pretrained
    index.write_text("")
    with pytest.raises(OSError, match="m: model_index.json is not readable JSON"):
        load(tmp_path / "m")
    index.write_text("{}")
    with pytest.raises(OSError, match=r"m: model_index.json lacks the vqvae, unet, scheduler entries of an "
                                      r"ADNILatentDiffusionPipeline"):
        load(tmp_path / "m")
    index.write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                 "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(OSError, match="m: model_index.json names a DDPMPipeline, not an ADNILatentDiffusionPipeline"):
        load(tmp_path / "m")
    # a scheduler entry that names no diffusers scheduler was a traceback ("module diffusers.schedulers has no
    # attribute DDPMSchedulr", "type object 'SchedulerMixin' has no attribute 'load_config'", "from_pretrained")
    for name in ("DDPMSchedulr", "SchedulerMixin", "KarrasDiffusionSchedulers", "__class__", "../x", 3):
        index.write_text(json.dumps({**json.loads(original), "scheduler": ["diffusers", name]}))
        with pytest.raises(OSError, match=r"m: model_index.json names the scheduler .*, not one of diffusers' "
                                          r"schedulers"):
            load(tmp_path / "m")
    index.write_text(json.dumps({**json.loads(original), "scheduler": ["diffusers", "DDIMScheduler"]}))
    assert type(load(tmp_path / "m").scheduler).__name__ == "DDIMScheduler"
    index.write_text(original)
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(OSError, match=r"m: the rest of unet/diffusion_pytorch_model.safetensors \(5000 (bytes, shorter "
                                      r"than its header|of \d+ bytes)\) is missing"):
        load(tmp_path / "m")


def test_a_step_count_the_scheduler_cannot_take_is_named(pipe):
    """diffusers' PNDM below 4 steps failed with "operands could not be broadcast together", naming nothing."""
    from diffusers import PNDMScheduler

    original = pipe.scheduler
    pipe.scheduler = PNDMScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="PNDMScheduler cannot take num_inference_steps=2"):
            pipe(batch_size=1, class_labels="AD", num_inference_steps=2)
        # with refinement, checked first, it was numpy's error alone
        with pytest.raises(ValueError, match="PNDMScheduler cannot take num_inference_steps=3; refinement and "
                                             "image-to-image need DDPM"):
            pipe(batch_size=1, class_labels="AD", num_inference_steps=3, refine_steps=1, refine_repeats=1)
    finally:
        pipe.scheduler = original


# ----------------------------------------------------------------------------- proposed by the mutation audit


def test_image_to_image_re_noises_the_encoded_image_to_its_first_timestep(pipe, monkeypatch):
    """strength 0.5 of 8 steps: the encoded image is put back (forward process) at the timestep the 4 remaining
    steps start from, not at the schedule's first (pure noise) or another one."""
    import adni_diffusers.pipeline_adni_ldm as module

    calls, seen = [], []

    def spy_renoise(x0, abar, noise):
        calls.append((abar, x0.clone()))
        return renoise(x0, abar, noise)

    monkeypatch.setattr(module, "renoise", spy_renoise)
    images = list(np.random.default_rng(0).integers(0, 255, (2, 256, 256), dtype=np.uint8))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    try:
        pipe(image=images, strength=0.5, num_inference_steps=8, generator=seeded(), output_type="latent",
             callback_on_step_end=lambda p, i, t, tensors: seen.append(int(t)) or {})
        pipe.scheduler.set_timesteps(8)
        full = [int(t) for t in pipe.scheduler.timesteps]
    finally:
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert seen == full[4:]
    assert [abar for abar, _ in calls] == [pytest.approx(float(pipe.scheduler.alphas_cumprod[full[4]]))]
    torch.testing.assert_close(calls[0][1], pipe.encode(images))


def test_class_names_keep_their_label_order(pipe, tmp_path):
    """class_names ["NC", "AD"] means label 0 is NC: the order given, not the alphabetical one, also after a save
    and a load (model_index.json stores {name: label})."""
    named = ADNILatentDiffusionPipeline(pipe.vqvae, pipe.unet, pipe.scheduler, ["NC", "AD"])
    named.set_progress_bar_config(disable=True)
    assert named.class_names == ["NC", "AD"]
    named.save_pretrained(tmp_path / "saved")
    loaded = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.class_names == ["NC", "AD"]
    loaded.set_progress_bar_config(disable=True)
    spy = UNetSpy(loaded.unet)
    try:
        loaded(batch_size=2, class_labels=["AD", "NC"], num_inference_steps=1, output_type="latent")
    finally:
        spy.remove()
    assert spy.labels[-1].tolist() == [1, 0]


def test_latents_a_callback_returns_replace_the_pipelines(pipe):
    """`callback_on_step_end` returning {"latents": x} replaces the latents the pipeline carries on with: returned
    at the last step, x is what comes out (the existing callback test returns zeros but never looks at them)."""
    def callback(p, step, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], 0.25)} if step == 2 else {}

    out = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), callback_on_step_end=callback,
               output_type="latent").images
    assert torch.equal(out, torch.full_like(out, 0.25))


def test_callback_steps_keep_counting_over_every_refinement_pass(pipe):
    """The callback's `step` counts on over the main loop and EVERY refinement pass (the GIF recorder and the
    progress bars key on it): 4 main steps and 3 passes of 2 are steps 0..9, each once."""
    seen = []

    def callback(p, step, t, tensors):
        seen.append(step)
        return {}

    pipe(batch_size=1, num_inference_steps=4, refine_steps=2, refine_repeats=3, generator=seeded(),
         callback_on_step_end=callback, output_type="latent")
    assert seen == list(range(10))


def test_a_callback_can_interrupt_sampling_and_read_num_timesteps(pipe):
    """diffusers' callback conventions: `pipeline.num_timesteps` (what `PipelineCallback`'s cutoff_step_ratio
    reads; it was an AttributeError) counts every step of the call, refinement included, and a callback setting
    `pipeline._interrupt = True` ends the run after that step (it was ignored: all steps ran)."""
    from diffusers.callbacks import PipelineCallback

    seen, totals = [], []

    def stop_after_step_1(p, step, t, tensors):
        seen.append(step)
        totals.append(p.num_timesteps)
        if step == 1:
            p._interrupt = True
        return {}

    stopped = pipe(num_inference_steps=5, refine_steps=2, refine_repeats=2, generator=seeded(),
                   callback_on_step_end=stop_after_step_1, output_type="latent").images
    assert seen == [0, 1] and totals == [9, 9]
    two_steps = pipe(num_inference_steps=5, generator=seeded(), output_type="latent",
                     callback_on_step_end=lambda p, step, t, tensors: {} if step < 1 else setattr(p, "_interrupt", True))
    assert torch.equal(stopped, two_steps.images)
    assert pipe.interrupt  # until the next call resets it
    seen.clear()
    pipe(num_inference_steps=3, generator=seeded(), output_type="latent",
         callback_on_step_end=lambda p, step, t, tensors: seen.append(step))
    assert seen == [0, 1, 2] and not pipe.interrupt

    class Cutoff(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(step_index)
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                pipeline._interrupt = True
            return callback_kwargs

    seen.clear()
    pipe(num_inference_steps=4, generator=seeded(), output_type="latent", callback_on_step_end=Cutoff(cutoff_step_ratio=0.5))
    assert pipe.num_timesteps == 4 and seen == [0, 1, 2]  # stopped after step int(4 * 0.5)


def test_an_image_with_a_single_non_finite_latent_is_reported(pipe, monkeypatch):
    """An image counts as broken when ANY of its latents is non-finite, not only when all are: one inf in the last
    step's latents (not spread by a further UNet pass) is reported as 1 of 2 images."""
    import adni_diffusers.pipeline_adni_ldm as module

    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)

    def callback(p, step, t, tensors):
        latents = tensors["latents"].clone()
        latents[1, 0, 0, 0] = float("inf")
        return {"latents": latents} if step == 1 else {}

    pipe(batch_size=2, num_inference_steps=2, generator=seeded(), callback_on_step_end=callback, output_type="latent")
    assert len(warned) == 1 and warned[0].startswith("1 of 2 images have non-finite latents")


def test_pil_pixels_are_the_np_output_rounded_to_8_bit(pipe):
    """output_type="pil" is the "np" image ROUNDED to 0..255 (as `data.to_uint8` makes training pixels), not
    truncated: truncation darkens about half of all pixels by one grey level."""
    kwargs = dict(batch_size=1, num_inference_steps=2, output_type="np")
    as_np = pipe(generator=seeded(), **kwargs).images
    as_pil = pipe(generator=seeded(), **{**kwargs, "output_type": "pil"}).images
    assert np.array_equal(np.asarray(as_pil[0]), (as_np[0, ..., 0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_a_late_start_steps_the_solver_at_its_own_timesteps(scheduler_cls):
    """Image-to-image (and refinement) start part-way along the timesteps: a multistep solver must be told where
    (`set_begin_index`), else it reads its sigmas from the START of the schedule (sigma_max) while the UNet sees
    the later timestep. Strength 0.5 of 10 steps: steps at timesteps[5:], solver step index 6, 7, ... after each."""
    p = make_pipe()
    p.scheduler = scheduler_cls.from_config(p.scheduler.config, timestep_spacing="trailing")
    seen = []

    def callback(pipe, step, t, tensors):
        seen.append((int(t), pipe.scheduler.step_index))
        return {}

    image = torch.rand(1, 1, 256, 256, generator=seeded()) * 2 - 1
    p(image=image, strength=0.5, num_inference_steps=10, generator=seeded(), callback_on_step_end=callback,
      output_type="latent")
    p.scheduler.set_timesteps(10)
    assert seen == [(int(p.scheduler.timesteps[5 + i]), 5 + i + 1) for i in range(5)]


def test_refinement_and_image_to_image_refuse_an_euler_scheduler():
    """Euler-type schedulers carry x_t * sqrt(sigma^2 + 1) (init_noise_sigma != 1): the variance-preserving
    re-noising of refinement and image-to-image would hand them a wrongly scaled start, silently. Both are refused
    by name; plain sampling with Euler still runs."""
    from diffusers import EulerDiscreteScheduler

    p = make_pipe()
    p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="not a variance-preserving scheduler"):
        p(batch_size=1, num_inference_steps=3, refine_steps=1, refine_repeats=1, output_type="latent")
    with pytest.raises(ValueError, match="not a variance-preserving scheduler"):
        p(image=torch.zeros(1, 1, 256, 256), strength=0.5, num_inference_steps=3, output_type="latent")
    assert p(batch_size=1, num_inference_steps=2, output_type="latent").images.shape == (1, 4, 32, 32)


def test_dpm_plus_plus_is_dpm_solver_plus_plus_whatever_config_it_is_built_from():
    """`--scheduler dpm++` names DPM-Solver++: built from a saved config that holds another DPM-Solver variant
    (a pipeline saved with `algorithm_type="dpmsolver"`), it is still dpmsolver++ (diffusers' default alone would
    keep the config's)."""
    from adni_diffusers.schedulers import make_scheduler

    other = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min").config
    assert make_scheduler("dpm++", other).config.algorithm_type == "dpmsolver++"

# ------------------------------------------------------------------------------------------ seventh mutation audit


def test_nearest_codes_are_the_nearest_not_the_most_aligned():
    """Decoding re-quantises every latent pixel to its NEAREST codebook row (as the VQModel's own quantiser):
    dropping the |c|^2 term picks the row with the largest dot product, i.e. long codebook vectors, and decodes
    another picture. Checked against brute-force distances, across chunk borders, and against diffusers' quantiser."""
    g = seeded(0)
    codebook = torch.randn(64, 4, generator=g) * torch.linspace(0.1, 5.0, 64)[:, None]  # rows of very unequal length
    vectors = torch.randn(1000, 4, generator=g)
    expected = torch.cdist(vectors, codebook).argmin(1)
    assert torch.equal(nearest_codes(vectors, codebook), expected)
    assert torch.equal(nearest_codes(vectors, codebook, chunk=7), expected)  # chunks of uneven size, joined in order
    # a tiny example to read: [4, 0] is nearer to 0 (distance 4) than to [10, 0] (distance 6)
    points, codes = torch.tensor([[4.0, 0.0], [6.0, 0.0]]), torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    assert nearest_codes(points, codes).tolist() == [0, 1]
    # the same codes as diffusers' VectorQuantizer (what the VQModel was trained with)
    vq = make_pipe().vqvae
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(torch.linspace(0.2, 3.0, vq.quantize.embedding.weight.shape[0])[:, None])
        h = torch.randn(2, vq.config.vq_embed_dim or vq.config.latent_channels, 8, 8, generator=g)
        quant, indices = quantize_latents(vq, h)
        own_quant, _, (_, _, own_indices) = vq.quantize(h)
    assert torch.equal(indices, own_indices.reshape(-1))
    torch.testing.assert_close(quant, own_quant)


def test_a_bf16_vqmodel_snaps_the_float32_latents_not_their_bf16_rounding():
    """decode in bf16 re-quantises the sampler's float32 latents: 1.009 lies nearer the code 1.015625 than 1.0, but
    rounded to bf16 first (1.0078125, halfway) it took the code 1.0."""
    from adni_diffusers.pipeline_adni_ldm import decode_latents

    vq = make_pipe().vqvae.to(torch.bfloat16)
    channels = vq.config.vq_embed_dim or vq.config.latent_channels
    with torch.no_grad():
        vq.quantize.embedding.weight.fill_(100.0)
        vq.quantize.embedding.weight[0] = 0.0
        vq.quantize.embedding.weight[1] = 0.0
        vq.quantize.embedding.weight[0, 0] = 1.0
        vq.quantize.embedding.weight[1, 0] = 1.015625
    latents = torch.zeros(1, channels, 4, 4)
    latents[:, 0] = 1.009 * vq.config.scaling_factor
    seen = []
    vq.decode = lambda quant, **kwargs: seen.append(quant) or SimpleNamespace(sample=torch.zeros(1, 1, 32, 32))
    decode_latents(vq, latents)
    assert seen[0].dtype == torch.bfloat16 and (seen[0][:, 0] == 1.015625).all()


def test_float_slices_240_high_are_padded_with_black_rows():
    """A 256x240 slice given as floats ([-1, 1] or [0, 1]) is padded with BLACK rows (-1), exactly as the uint8 or
    PIL form: padding the floats with 0 put mid-grey bands above and below the brain, which the model never saw."""
    pixels = np.random.default_rng(3).integers(0, 256, (240, 256)).astype(np.uint8)
    pixels[:, 0] = 0  # a black border, so the [-1, 1] form has negative values
    expected = prepare_slices(pixels)
    assert (expected[0, 0, :8] == -1).all() and (expected[0, 0, -8:] == -1).all()
    for name, form in {"float array in [-1, 1]": pixels.astype(np.float32) / 127.5 - 1,
                       "float tensor in [0, 1]": torch.from_numpy(pixels).float() / 255}.items():
        torch.testing.assert_close(prepare_slices(form), expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("make, message", [
    (lambda a: np.stack([a, a, np.where(a > 128, a // 2, a).astype(np.uint8)], -1), "colour RGB image"),
    (lambda a: np.stack([a, a, np.where(a > 128, a // 2, a).astype(np.uint8), np.full_like(a, 255)], -1),
     "colour RGBA image"),
    # a level apart (a lossy codec without a grey mode): refused too, and said so
    (lambda a: np.stack([a, a, np.where(a > 128, a - 1, a).astype(np.uint8)], -1),
     r"RGB image whose channels differ by at most 1 level \(a greyscale slice saved in colour by a lossy codec: "
     r"colour JPEG, lossy WebP\?\)"),
], ids=["blue differs", "opaque colour RGBA", "a level apart"])
def test_prepare_slices_refuses_images_tinted_in_any_channel(make, message):
    """Only grey RGB/RGBA pass as greyscale (their first channel is taken): a blue channel that differs, or colour in
    an opaque RGBA image, would otherwise be read silently as the red channel's slice."""
    grey = np.random.default_rng(4).integers(0, 256, (240, 256)).astype(np.uint8)
    image = PIL.Image.fromarray(make(grey))
    with pytest.raises(ValueError, match=f"{message}; expected 8-bit greyscale") as error:
        prepare_slices(image)
    if "lossy codec" in message:  # advice that fits a file already a JPEG too
        assert str(error.value).endswith("save it as a greyscale (mode L) PNG or JPEG")


def test_a_negative_class_label_is_refused_by_name(pipe):
    """Label -1 is not a class (0..null_class - 1): it must be refused as out of range, not passed to the UNet's
    embedding (an IndexError there, or Python's -1 meaning the last, unconditional class)."""
    with pytest.raises(ValueError, match=r"class label -1 out of range: expected 0..1"):
        pipe(class_labels=-1, num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="out of range"):
        pipe(batch_size=2, class_labels=[0, -1], num_inference_steps=1, output_type="latent")



def test_a_2d_tensor_of_class_labels_is_refused_but_a_column_is_labels(pipe):
    """class_labels=tensor([[0, 1], [1, 0]]) was flattened into 4 images without a word; a column (N, 1), as a data
    loader gives labels, is N labels."""
    import torch

    with pytest.raises(ValueError, match=r"class_labels of shape \(2, 2\): expected one label per image"):
        pipe(class_labels=torch.tensor([[0, 1], [1, 0]]), num_inference_steps=1, output_type="latent")
    out = pipe(class_labels=torch.tensor([[0], [1]]), num_inference_steps=1, output_type="latent")
    assert len(out.images) == 2


def test_a_bool_class_label_is_refused(pipe):
    """True and False are ints to Python (NC and AD here): a mask or flag passed by mistake must not pick a class."""
    import torch

    for labels in (True, [0, False], torch.tensor([True, False]), np.array(True)):
        with pytest.raises(ValueError, match=r"class label (True|False) is a bool: expected 0..1 or one of \['AD', 'NC'\]"):
            pipe(batch_size=2, class_labels=labels, num_inference_steps=1, output_type="latent")


def test_labels_taken_one_by_one_from_a_dataset_are_their_numbers(pipe):
    """A list of 0-d tensors ([sample["label"] for ...]) was refused as "class label tensor(0) out of range"; a
    label of a wrong type now says so."""
    import torch

    def labels_of(class_labels):
        return pipe._labels(class_labels, 2).tolist()

    assert labels_of(list(torch.tensor([0, 1]))) == labels_of([np.int64(0), np.array(1)]) == [0, 1]
    with pytest.raises(ValueError, match=r"class label 1.0 is a float: expected an int 0..1"):
        pipe(batch_size=2, class_labels=[0, 1.0], num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="class label 2 out of range"):
        labels_of(list(torch.tensor([0, 2])))


def test_np_and_pil_outputs_are_the_pt_images_channels_last(pipe):
    """"np" is the "pt" image with the channel moved last, (N, H, W, 1), and "pil" its rounded 8-bit pixels: rows
    stay rows. A transposed layout keeps the square shape, so only the pixels tell (a brain on its side)."""
    latents = torch.randn(2, 4, 32, 32, generator=seeded(5))
    pt = pipe.decode(latents, output_type="pt")
    arr = pipe.decode(latents, output_type="np")
    pil = pipe.decode(latents, output_type="pil")
    assert not torch.allclose(pt, pt.transpose(2, 3), atol=1e-3)  # the check below can tell a transpose
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    for image, expected in zip(pil, pt[:, 0]):
        np.testing.assert_array_equal(np.asarray(image), (expected.numpy() * 255).round().astype(np.uint8))


def test_negative_refinement_counts_are_refused(pipe):
    """refine_repeats=-1 (or refine_steps=-1) is a mistake, not "no refinement": refused like the CLI refuses it,
    rather than silently sampling without the refinement the caller asked about."""
    with pytest.raises(ValueError, match="refine_steps"):
        pipe(num_inference_steps=2, refine_steps=1, refine_repeats=-1, output_type="latent")
    with pytest.raises(ValueError, match="refine_steps=-1"):
        pipe(num_inference_steps=2, refine_steps=-1, output_type="latent")


def test_strength_one_denoises_the_whole_schedule_from_its_first_timestep(pipe, monkeypatch):
    """strength=1 is documented as "from (almost) pure noise": allowed, all num_inference_steps run, and the encoded
    image is re-noised to the schedule's first timestep (t = 999 with trailing spacing)."""
    import adni_diffusers.pipeline_adni_ldm as module

    levels = []
    def recording_renoise(x0, abar, noise):
        levels.append(abar)
        return renoise(x0, abar, noise)

    monkeypatch.setattr(module, "renoise", recording_renoise)
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
    spy = UNetSpy(pipe.unet)
    try:
        out = pipe(image=np.zeros((240, 256), np.uint8), strength=1.0, num_inference_steps=3, generator=seeded(),
                   output_type="latent").images
    finally:
        spy.remove()
        pipe.scheduler = original
    assert out.shape == (1, 4, 32, 32)
    assert spy.calls == 3 and levels == [pytest.approx(float(original.alphas_cumprod[999]))]


def test_guidance_below_one_without_a_class_is_refused(pipe):
    """guidance_scale < 1 (a weaker class, or 0: the unconditional model) also needs class_labels: without them it
    changed nothing, silently, just as guidance > 1 would."""
    for w in (0.5, 0.0, -1.0):
        with pytest.raises(ValueError, match=f"guidance_scale={w} needs class_labels"):
            pipe(num_inference_steps=1, guidance_scale=w, output_type="latent")


def test_a_bfloat16_pipeline_encodes_slices():
    """A pipeline loaded with dtype=bfloat16 (or float16 on a GPU) takes slices for `encode` (and so image-to-image):
    the float32 pixels are cast to the VQModel's dtype, else its first convolution fails on mixed dtypes."""
    low = make_pipe().to(dtype=torch.bfloat16)
    slice_ = np.random.default_rng(6).integers(0, 256, (240, 256)).astype(np.uint8)
    latents = low.encode(slice_)
    assert latents.shape == (1, 4, 32, 32) and latents.dtype == torch.float32 and torch.isfinite(latents).all()


@pytest.mark.parametrize("strength, steps_run", [(0.05, 1), (0.15, 2), (0.25, 3), (0.5, 5), (0.04, 0)])
def test_strength_selects_its_share_of_the_steps_rounded_half_up(pipe, strength, steps_run):
    """Image-to-image runs steps x strength of the sampler's steps, halves rounded up: Python's round() took 0.15
    and 0.25 of 10 steps both to 2, and 0.05 to none (the VQ reconstruction, for a strength above 0)."""
    spy = UNetSpy(pipe.unet)
    try:
        pipe(image=np.zeros((240, 256), np.uint8), strength=strength, num_inference_steps=10, generator=seeded(),
             output_type="latent")
    finally:
        spy.remove()
    assert spy.calls == steps_run


def test_strength_halves_are_halves_in_floating_point_too():
    """50 x 0.29 is 14.499999999999998 in floating point: a half, rounded up like 0.15 of 10 steps."""
    from adni_diffusers.pipeline_adni_ldm import strength_steps

    assert [strength_steps(50, 0.29), strength_steps(25, 0.58), strength_steps(50, 0.57)] == [15, 15, 29]
    assert [strength_steps(10, 0.15), strength_steps(10, 0.14), strength_steps(10, 1.0)] == [2, 1, 10]


def test_ddim_eta_draws_variance_from_the_generator():
    """`eta` reaches DDIM's step: eta=1 adds DDPM's variance (another image than eta=0, the same one again from
    the same seed, on every pass of the refinement loop too); a scheduler that takes no eta refuses a nonzero one
    rather than ignoring it."""
    pipe = make_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=4, class_labels="AD", output_type="latent")
    deterministic = pipe(generator=seeded(), **kw).images
    noisy = pipe(generator=seeded(), eta=1.0, **kw).images
    assert not torch.allclose(noisy, deterministic, atol=1e-3)
    torch.testing.assert_close(pipe(generator=seeded(), eta=1.0, **kw).images, noisy)
    refined = pipe(generator=seeded(), eta=1.0, refine_steps=2, refine_repeats=1, **kw).images
    torch.testing.assert_close(pipe(generator=seeded(), eta=1.0, refine_steps=2, refine_repeats=1, **kw).images, refined)
    with pytest.raises(ValueError, match="eta=-0.5: expected a number >= 0"):
        pipe(eta=-0.5, **kw)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="eta=0.5: DPMSolverMultistepScheduler takes no eta; only DDIM does"):
        pipe(eta=0.5, **kw)
    assert pipe(eta=0.0, **kw).images.shape == (1, 4, 32, 32)


def test_default_steps_are_the_models_training_timesteps():
    """`pipe()` with no num_inference_steps runs full DDPM over the model's own timesteps: 1000 for ours, and 20 for a
    model trained with --num_train_timesteps 20 (a fixed default of 1000 was refused by its scheduler)."""
    pipe = make_pipe()
    pipe = make_pipe(scheduler=DDPMScheduler.from_config(pipe.scheduler.config, num_train_timesteps=20))
    spy = UNetSpy(pipe.unet)
    try:
        latents = pipe(generator=seeded(), class_labels="AD", output_type="latent").images
    finally:
        spy.remove()
    assert spy.calls == 20 and latents.shape == (1, 4, 32, 32)
    assert inspect.signature(ADNILatentDiffusionPipeline.__call__).parameters["num_inference_steps"].default is None


@pytest.mark.parametrize("scheduler", [DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_more_steps_than_training_timesteps_are_refused_for_every_scheduler(pipe, scheduler):
    """DDPM and DDIM refuse more steps than the model's timesteps; DPM-Solver++ and UniPC took 1500 and made NaN
    latents, which decode to a plausible-looking codebook pattern."""
    original = pipe.scheduler
    pipe.scheduler = scheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="num_inference_steps=1001: more steps than this model's 1000 training"):
            pipe(num_inference_steps=1001, output_type="latent")
    finally:
        pipe.scheduler = original


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_weights_are_readable_like_the_configs_beside_them(pipe, tmp_path, tiny_ldm, tiny_vq):
    """safetensors 0.8 writes owner-only (0600) files whatever the umask (safetensors issue 782): a labmate could
    read a shared model's config.json but not its weights, nor the checkpoints or the latent cache."""
    from adni_diffusers.features import FeatureNet, save_feature_net

    old = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "saved")
        save_feature_net(FeatureNet(num_classes=2), tmp_path / "net")
        made_here = [*(tmp_path / "saved").rglob("*.safetensors"), *(tmp_path / "net").rglob("*.safetensors")]
        assert len(made_here) == 3 and {oct(p.stat().st_mode & 0o777) for p in made_here} == {"0o644"}
        os.umask(0o077)  # a private umask stays private
        pipe.save_pretrained(tmp_path / "private")
        assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "private").rglob("*.safetensors")} == {"0o600"}
    finally:
        os.umask(old)
    # what the training scripts wrote under the session's umask: models, checkpoints, latent cache
    trained = [*tiny_ldm.rglob("*.safetensors"), *tiny_vq.rglob("*.safetensors")]
    kinds = {p.relative_to(p.parents[1]).parts[0].split("-")[0] for p in trained}
    assert {"unet", "vqvae", "checkpoint", "latent_cache"} <= kinds, kinds
    assert {oct(p.stat().st_mode & 0o777) for p in trained} == {oct(0o666 & ~old)}


def gaussian_data_denoiser(pipe, mean=0.5, std=0.3):
    """Make `pipe.unet` the exact epsilon-prediction for latents drawn from N(mean, std^2) per element: at
    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mean) / Var(x_t)."""
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()

    def forward(sample, timestep, class_labels=None, **kwargs):
        abar = float(alphas_cumprod[int(timestep)])
        variance = abar * std**2 + 1 - abar
        eps = (1 - abar) ** 0.5 * (sample.double() - abar**0.5 * mean) / variance
        return SimpleNamespace(sample=eps.to(sample.dtype))

    pipe.unet.forward = forward


@pytest.mark.parametrize("scheduler_cls", [UniPCMultistepScheduler, DPMSolverSinglestepScheduler, DDIMScheduler])
def test_latents_a_callback_returns_mid_run_are_what_the_sampler_continues_from(scheduler_cls):
    """A callback replacing the latents at step 2 of 6 with run A's latents at that step makes run B (another seed)
    finish where A does. UniPC's corrector rebuilt x_3 from ITS stored x_2 (and DPM-Solver singlestep's second-order
    sub-step stepped from the sample stored at its group's start), so B came out as B: the replacement was lost.
    The same for a change made in place."""
    p = make_pipe(conditional=False)
    p.scheduler = scheduler_cls.from_config(p.scheduler.config, timestep_spacing="trailing")
    gaussian_data_denoiser(p)  # a smooth model: a random UNet's outputs of hundreds blur what is compared
    kwargs = dict(batch_size=1, num_inference_steps=6, output_type="latent")
    at_step_2 = {}

    def record(pipe, step, t, tensors):
        if step == 2:
            at_step_2["latents"] = tensors["latents"].clone()
        return {}

    a = p(generator=seeded(1), callback_on_step_end=record, **kwargs).images
    b = p(generator=seeded(2), **kwargs).images
    swapped = p(generator=seeded(2), callback_on_step_end=lambda pipe, step, t, tensors: (
        {"latents": at_step_2["latents"].clone()} if step == 2 else {}), **kwargs).images

    def in_place(pipe, step, t, tensors):
        if step == 2:
            tensors["latents"].copy_(at_step_2["latents"])
        return {}

    swapped_in_place = p(generator=seeded(2), callback_on_step_end=in_place, **kwargs).images
    for out in (swapped, swapped_in_place):
        assert (out - a).abs().mean() < 0.05 * (out - b).abs().mean()


@pytest.mark.parametrize("scheduler, warns", [
    (lambda config: DDIMScheduler(timestep_spacing="trailing"), True),  # diffusers' default clip_sample=True
    (lambda config: DDPMScheduler(), True),
    (lambda config: DPMSolverMultistepScheduler.from_config(config, thresholding=True), True),
    (lambda config: DDIMScheduler.from_config(config), False),
    (lambda config: UniPCMultistepScheduler.from_config(config), False),
])
def test_a_scheduler_that_clips_the_latents_is_warned_about(pipe, monkeypatch, scheduler, warns):
    """A scheduler built with diffusers' defaults instead of from the pipeline's config clips every x0 prediction
    to [-1, 1]: unit-variance latents (about 1 in 3 outside) came out squeezed into [-1, 1], silently."""
    import adni_diffusers.pipeline_adni_ldm as module

    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)
    saved = pipe.scheduler
    try:
        pipe.scheduler = scheduler(saved.config)
        out = pipe(batch_size=1, num_inference_steps=2, generator=seeded(), output_type="latent").images
        pipe(batch_size=1, num_inference_steps=2, generator=seeded(), output_type="latent")  # said once, not per call
        assert len([w for w in warned if "clipped" in w]) == warns
        pipe.scheduler = scheduler(saved.config)  # another scheduler: said again
        pipe(batch_size=1, num_inference_steps=2, generator=seeded(), output_type="latent")
    finally:
        pipe.scheduler = saved
    assert [w for w in warned if "clipped" in w] == ([warned[0]] * 2 if warns else [])
    if warns:
        assert "from_config(pipe.scheduler.config)" in warned[0]
        if "clip_sample" in warned[0]:
            assert out.abs().max() <= 1.0  # what it warns about


def test_a_callback_changing_latents_inside_a_heun_step_is_warned_about(pipe, monkeypatch):
    """Heun's second sub-step steps from the sample its first stored: a change between them cannot take effect as
    given, and is named (no warning when the callback leaves the latents as they are)."""
    from diffusers import HeunDiscreteScheduler

    import adni_diffusers.pipeline_adni_ldm as module

    warned = []
    monkeypatch.setattr(module.logger, "warning", warned.append)
    saved = pipe.scheduler
    try:
        pipe.scheduler = HeunDiscreteScheduler.from_config(saved.config)
        kwargs = dict(batch_size=1, num_inference_steps=2, generator=seeded(), output_type="latent")
        pipe(callback_on_step_end=lambda p, step, t, tensors: {"latents": tensors["latents"].clone()}, **kwargs)
        assert warned == []
        pipe(callback_on_step_end=lambda p, step, t, tensors: {"latents": tensors["latents"] + 1} if step == 0 else {},
             **kwargs)
    finally:
        pipe.scheduler = saved
    assert len(warned) == 1 and "HeunDiscreteScheduler steps on from its own copy" in warned[0]


# ------------------------------------------------------------------------------------------- eighth mutation audit


@pytest.mark.parametrize("scheduler_cls, steps, refine", [
    (DPMSolverMultistepScheduler, 25, 0),
    (DPMSolverMultistepScheduler, 25, 12),  # two refinement passes from halfway
    (DDPMScheduler, 200, 0),
    ("EulerDiscreteScheduler", 100, 0),  # starts from noise of std sigma_max, not 1
], ids=["dpm++", "dpm++-refined", "ddpm", "euler"])
def test_sampling_with_the_exact_denoiser_draws_from_the_data_distribution(scheduler_cls, steps, refine):
    """With the exact noise prediction for latents drawn from N(0.5, 1), the samples are N(0.5, 1): the end-to-end
    check of the sampler. Clamping the latents after each step (the seed's bug), noise at the wrong scale, the UNet
    given another timestep than the scheduler steps at, a refinement pass without re-noising, or one noise for every
    pass, each shift the mean or the spread by 0.1 or more (the other tests compare the pipeline with itself)."""
    import diffusers

    if isinstance(scheduler_cls, str):
        scheduler_cls = getattr(diffusers, scheduler_cls)
    p = make_pipe(conditional=False)
    p.scheduler = scheduler_cls.from_config(p.scheduler.config, timestep_spacing="trailing")
    gaussian_data_denoiser(p, mean=0.5, std=1.0)  # unit variance, like the scaled latents: a third lies outside +-1
    out = p(batch_size=4, num_inference_steps=steps, refine_steps=refine, refine_repeats=2 if refine else 0,
            generator=seeded(), output_type="latent").images
    # 16384 values: the mean's standard error is 0.008; the samplers' own discretisation error is up to 0.02
    assert abs(out.mean().item() - 0.5) < 0.03 and abs(out.std().item() - 1.0) < 0.04


def test_callback_x0_pred_after_a_late_start_is_the_solvers_own():
    """Image-to-image and refinement start part-way along the timesteps: the callback's x0 prediction there is taken
    at the noise level of the solver's step index (here 5.., then 8..), not at the index within the pass (0..),
    which for Karras sigmas is another noise level (the plain sampling of the test above starts at index 0)."""
    pipe = make_pipe()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    given, own = [], record_schedulers_x0(pipe.scheduler)
    pipe(image=np.full((240, 256), 90, np.uint8), strength=0.5, num_inference_steps=10, refine_steps=2,
         refine_repeats=1, class_labels=0, generator=seeded(), output_type="latent",
         callback_on_step_end=lambda p, i, t, tensors: given.append(tensors["x0_pred"].clone()) or {},
         callback_on_step_end_tensor_inputs=["x0_pred"])
    assert len(own) == len(given) == 5 + 2
    for a, b in zip(given, own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_bfloat16_pipeline_keeps_the_sampler_state_float32(monkeypatch):
    """Only the networks run in a low-precision pipeline's dtype: the starting noise is the seed's float32 draw and
    every scheduler step (refinement included) steps float32 latents; bf16 ones drift over 1000 DDPM steps."""
    low = make_pipe().to(dtype=torch.bfloat16)
    low.set_progress_bar_config(disable=True)
    stepped = []
    real_step = low.scheduler.step
    monkeypatch.setattr(low.scheduler, "step", lambda out, t, sample, **k: stepped.append(sample.clone())
                        or real_step(out, t, sample, **k))
    out = low(num_inference_steps=3, refine_steps=1, refine_repeats=1, class_labels="AD", generator=seeded(),
              output_type="latent").images
    assert len(stepped) == 4 and all(s.dtype == torch.float32 for s in [*stepped, out])
    assert torch.equal(stepped[0], torch.randn(1, 4, 32, 32, generator=seeded()))


def test_init_annotations_are_types_that_diffusers_0_33_to_0_36_can_read():
    """diffusers 0.33 to 0.36 match each __init__ argument against its annotation as written; with
    `from __future__ import annotations` every annotation was a string, and a saved model failed to load there
    (KeyError: 'class_names'). Each must be a class or a typing Union (which `X | None` is not, to them)."""
    from typing import Union, get_origin

    for name, parameter in inspect.signature(ADNILatentDiffusionPipeline.__init__).parameters.items():
        if name != "self":
            annotation = parameter.annotation
            assert inspect.isclass(annotation) or get_origin(annotation) is Union, (name, annotation)
    assert set(ADNILatentDiffusionPipeline._get_signature_types()) >= {"vqvae", "unet", "scheduler", "class_names",
                                                                       "preprocess"}


def test_a_diffusers_older_than_0_26_is_refused_with_what_to_do():
    """0.25 samples DPM-Solver++ differently, 0.22 to 0.24 load the tiny / small VQModel with random attention
    weights after a mere warning: the shipped file refuses them at import, naming the version and the upgrade."""
    from adni_diffusers.pipeline_adni_ldm import check_diffusers_version

    for version in ("0.24.0", "0.25.1"):
        with pytest.raises(ImportError, match=rf"needs diffusers >= 0\.26; this is diffusers {version}\. "
                                               r"Upgrade it: pip install --upgrade 'diffusers>=0\.26'"):
            check_diffusers_version(version)
    for version in ("0.26.0", "0.42.1", "0.43.0.dev0", "1.0.0"):
        check_diffusers_version(version)


def test_guidance_zero_with_a_class_is_refused(pipe):
    """guidance_scale=0 is eps_uncond + 0 (eps_cond - eps_uncond): the unconditional model, whatever the label, so
    class_labels="AD" and "NC" gave the same images without a word (a diffusers habit: guidance_scale=0 "turns guidance
    off" in pipelines that skip it at <= 1). `generate --class --guidance 0` refuses it; the pipeline now does too."""
    with pytest.raises(ValueError, match=r"guidance_scale=0.0 samples the unconditional model.*class_labels would "
                                         r"have no effect.*guidance_scale=1.0"):
        pipe(batch_size=1, class_labels="AD", guidance_scale=0.0, num_inference_steps=1, output_type="latent")
    # other weights below 1 still mix the class in, and 1 is the label alone
    for w in (0.5, 1.0):
        assert pipe(batch_size=1, class_labels="AD", guidance_scale=w, num_inference_steps=1,
                    output_type="latent").images.shape == (1, 4, 32, 32)


@pytest.mark.parametrize("preprocess, size", [("fit", (181, 217)), ("resize", (181, 217)), ("fit", (300, 411))])
def test_slice_size_images_stay_in_0_1_and_go_back_in_as_image(preprocess, size):
    """Scaling back (bilinear, antialiased) rounded white to 1.0000001: the images were outside the [0, 1] the
    pipeline promises, and `image=` / `encode` refused its own `output_type="pt"` and "np" images."""
    white = torch.ones(2, 1, 256, 256)
    back = to_slice_size(white, size, preprocess)
    assert back.min() >= 0 and back.max() <= 1, float(back.max())
    base = make_pipe()
    pipe = ADNILatentDiffusionPipeline(base.vqvae, base.unet, base.scheduler, ["AD", "NC"], preprocess=preprocess)
    pipe.encode(back)  # refused with "values in [0, 1]; expected floats in [-1, 1] (or [0, 1])"
