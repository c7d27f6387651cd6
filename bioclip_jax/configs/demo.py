"""The quick-start job: a small CLIP trained on the synthetic tree of life on a CPU in a few minutes.

    bioclip-jax demo                       # writes the synthetic shards, trains, evaluates per rank, exports
    bioclip-jax train --config configs/demo.py --workdir runs/demo --config.data.train=runs/demo/data/train
"""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "demo"
    c.dtype = "float32"
    c.log_every_steps = 10
    c.data.train = "runs/demo/data/train"
    c.data.val = "runs/demo/data/val"
    c.data.heldout = "runs/demo/data/heldout"
    c.data.normalization = "openai"
    c.train.global_batch_size = 96
    c.train.steps = 500
    c.train.lr = 2e-3
    c.train.warmup_steps = 40
    c.train.weight_decay = 0.1
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 0
    c.eval.batch_size = 256
    return c
