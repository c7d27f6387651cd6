"""`python -m bioclip_jax.cli ...`, as `bioclip-jax ...` (the multi-process tests start trainers this way)."""

import sys

from bioclip_jax.cli import main

sys.exit(main())
