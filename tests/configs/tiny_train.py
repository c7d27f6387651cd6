"""A few steps of the `tiny` CLIP on test shards (tests pass --config.data.train=...)."""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "tiny"
    c.dtype = "float32"
    c.log_every_steps = 1
    c.data.normalization = "openai"
    c.train.global_batch_size = 16
    c.train.steps = 6
    c.train.lr = 1e-3
    c.train.warmup_steps = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 10
    c.checkpoint.async_save = False
    return c
