"""The samplers we test and compare, by short name, with the step counts they are meant for."""

from __future__ import annotations

# classifier-free guidance for a class-conditional model sampled toward a class (generate, evaluate, the demo):
# 1 (none) was the worst setting on each of the three CPU demo models measured (docs/results.md, ablations)
DEFAULT_GUIDANCE_CONDITIONAL = 2.0

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
