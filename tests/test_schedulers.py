"""The samplers by short name (schedulers.py)."""

# --- mutation audit 2026-12-05 (small modules)

import pytest


def test_an_unknown_sampler_name_is_refused_naming_the_known_ones():
    """A misspelt name from Python (generate's --scheduler has argparse's choices) is a ValueError the command line
    turns into one line, naming the names there are; not a KeyError's traceback."""
    from diffusers import DDPMScheduler

    from adni_diffusers.schedulers import make_scheduler

    with pytest.raises(ValueError, match=r"unknown scheduler 'ddpn': expected one of ddpm, ddim, dpm\+\+, unipc"):
        make_scheduler("ddpn", DDPMScheduler().config)
