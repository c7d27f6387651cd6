"""BioCLIP 2 recipe: ViT-L/14 from LAION-2B open_clip weights, TreeOfLife-200M, 30 epochs, global batch 90,112, bf16.

FSDP shards params and optimizer state over the data axis (ViT-L/14 with AdamW is ~5 GB of fp32 state per replica).
The LAION replay head (`visual.continual_proj`) of BioCLIP 2 is not part of this recipe.
"""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "ViT-L-14"
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.scan_layers = True  # one compiled block per tower (docs/performance.md, "Scan over layers")
    c.require_init = True  # BioCLIP 2 starts from LAION-2B open_clip weights (--config.init=PATH or =scratch)
    c.init_model = "ViT-L-14"
    c.eval.normalization = "openai"
    c.data.train = "shards/treeoflife-200m/train"
    c.data.val = "shards/treeoflife-200m/val"
    c.train.global_batch_size = 90112
    c.train.epochs = 30  # over the training split, counted at start
    c.train.steps = 0
    c.train.fsdp = True
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 2000
    return c
