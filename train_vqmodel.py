#!/usr/bin/env python
"""Stage 1: train the VQModel (1x256x256 slice -> 4x32x32 latent) with Accelerate.

    accelerate launch train_vqmodel.py --train_data_dir AD_NC --output_dir out/vq --preset base

The stage itself is adni_diffusers/train_vqmodel.py (so that `adni-diffusers demo` and
`accelerate launch -m adni_diffusers.train_vqmodel` run the same code); `--help` lists every flag.
"""

import sys

from adni_diffusers.train_vqmodel import cli

if __name__ == "__main__":
    sys.exit(cli())
