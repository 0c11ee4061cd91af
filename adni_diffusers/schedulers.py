"""The samplers we test and compare, by short name, with the step counts they are meant for."""

from __future__ import annotations

# classifier-free guidance for a class-conditional model sampled toward a class (generate, evaluate, the demo):
# 1 (none) was the worst setting on each of the three CPU demo models measured (docs/results.md, ablations)
DEFAULT_GUIDANCE_CONDITIONAL = 2.0



def no_label_class_untrained(model) -> bool:
    """Whether a local model folder's training_args.json records --cond_dropout 0: the "no label" class, the
    unconditional half of classifier-free guidance, was never trained (train_unet warns; the card shows guidance 1).
    False where the folder does not say (a Hub repo id, a copy without the records)."""
    from pathlib import Path

    from .files import read_json_object

    value = read_json_object(Path(str(model)) / "training_args.json").get("cond_dropout")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def guidance_for(model, guidance: float | None, toward_class: bool) -> float:
    """--guidance as given, else the default: DEFAULT_GUIDANCE_CONDITIONAL toward a class, 1 (none) without one or
    for a model whose "no label" class was never trained (`no_label_class_untrained`), where guidance would mix in
    an untrained embedding's prediction: a guidance other than 1 given for such a model is warned of."""
    untrained = toward_class and no_label_class_untrained(model)
    if guidance is None:
        return DEFAULT_GUIDANCE_CONDITIONAL if toward_class and not untrained else 1.0
    if untrained and guidance != 1.0:
        import logging

        logging.getLogger(__name__).warning(
            "--guidance %g: %s was trained with --cond_dropout 0, so its 'no label' class, guidance's unconditional "
            "half, was never trained: 1 (no guidance) is the setting it was trained for", guidance, model)
    return float(guidance)


SCHEDULERS = {
    # name: (diffusers class, default number of steps, extra config)
    "ddpm": ("DDPMScheduler", 1000, {}),
    "ddim": ("DDIMScheduler", 50, {}),
    "dpm++": ("DPMSolverMultistepScheduler", 25, {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", 10, {}),
}


def make_scheduler(name: str, config):
    """A scheduler of kind `name` built from a trained pipeline's scheduler config (same betas), with
    "trailing" timesteps also for models saved before 2026-12-02 with diffusers' default "leading" (see
    `diffusion.make_noise_scheduler`: otherwise a short run starts below t = 999 from pure noise)."""
    import diffusers

    from .diffusion import TIMESTEP_SPACING

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    class_name, _, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **{"timestep_spacing": TIMESTEP_SPACING, **extra})


def default_steps(name: str, config=None) -> int:
    """The step count sampler `name` is meant for; given a model's scheduler `config`, at most its training
    timesteps (DDPM's 1000 is all of a standard model's, and a model trained with fewer takes no more)."""
    steps = SCHEDULERS[name][1]
    return steps if config is None else min(steps, int(config["num_train_timesteps"]))
