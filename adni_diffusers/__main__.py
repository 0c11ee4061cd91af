"""`python -m adni_diffusers ...`: the `adni-diffusers` command, where its console script is not on PATH."""

import sys

from adni_diffusers.cli import main

if __name__ == "__main__":
    sys.exit(main())
