#!/usr/bin/env python
"""Script form of `bioclip-jax convert SRC DST [--model NAME] [--no-bin]`: open_clip <-> bioclip_jax weights."""

import sys

from bioclip_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
