"""`python -m bioclip_jax ...` runs the `bioclip-jax` command line."""

import sys

from bioclip_jax.cli import main

sys.exit(main())
