"""BioCLIP v1 (Stevens et al., CVPR 2024): OpenAI CLIP ViT-B/16 (QuickGELU) fine-tuned on TreeOfLife-10M.

100 epochs at global batch 32,768 (~30K steps over ~10M images), lr 1e-4, 1,000 warmup steps, cosine to 0, AdamW
(0.9, 0.98, eps 1e-6), weight decay 0.2, mixed text type, no gradient clipping.

Sized for a v5e-64 (512 pairs per chip: remat full and FSDP; docs/tpu.md section 4 has the compiled memory).
`--config.remat=dots` on a v5e-128 runs no forward twice: about 3/4 of the chip-hours (`bioclip-jax plan --config
bioclip_vitb16 --search v5e` prints both).

    bioclip-jax train --config configs/bioclip_vitb16.py --workdir runs/bioclip \
        --config.data.train=shards/tol10m/train --config.init=ViT-B-16-openai/open_clip_model.safetensors
"""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "ViT-B-16-quickgelu"
    c.dtype = "bfloat16"
    c.remat = "full"  # BioCLIP used gradient checkpointing to fit 4,096 per GPU; here 512 per v5e chip
    c.scan_layers = True  # one compiled block per tower (docs/performance.md, "Scan over layers")
    c.require_init = True  # BioCLIP starts from OpenAI's CLIP: --config.init=PATH (or =scratch to train from random)
    c.init_model = "ViT-B-16-quickgelu"  # OpenAI's weights: QuickGELU
    c.eval.normalization = "openai"  # trained on ImageNet statistics, evaluated and exported with OpenAI's
    c.data.train = "shards/treeoflife-10m/train"
    c.data.val = "shards/treeoflife-10m/val"
    c.train.global_batch_size = 32768
    c.train.epochs = 100  # over the training split (counted at start: ~9.9M images of TreeOfLife-10M)
    c.train.steps = 0
    c.train.fsdp = True  # params and optimizer state sharded: what lets 512 pairs per chip fit a v5e's 16 GiB
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 2000
    return c
