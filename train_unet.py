#!/usr/bin/env python
"""Stage 2: train the UNet on the VQModel latents and save the whole pipeline.

    accelerate launch train_unet.py --vqmodel out/vq --train_data_dir AD_NC --output_dir out/ldm --conditional

The stage itself is adni_diffusers/train_unet.py (so that `adni-diffusers demo` and
`accelerate launch -m adni_diffusers.train_unet` run the same code); `--help` lists every flag.
"""

import sys

from adni_diffusers.train_unet import cli

if __name__ == "__main__":
    sys.exit(cli())
