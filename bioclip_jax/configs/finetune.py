"""Fine-tune a CLIP (BioCLIP, BioCLIP 2, any weights `bioclip_jax.load` reads) on a user's labelled images.

`bioclip-jax finetune` runs this recipe through the trainer and fills in what depends on the data and the machine:
the model and its weights, the shards it makes from a folder or CSV, the batch, accumulation and remat chosen from
the device's memory, the steps from the dataset size and warmup as a fraction of them (train/finetune.py). Run by hand:

    bioclip-jax train --config finetune --workdir runs/ft --config.model=ViT-B-16-quickgelu \
        --config.init=bioclip --config.data.train=SHARDS/train --config.train.trainable=lora
"""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "ViT-B-16-quickgelu"  # BioCLIP's architecture; finetune sets the start model's own
    c.init = "bioclip"
    c.require_init = True
    c.eval.normalization = "openai"  # BioCLIP's released preprocessing
    c.data.normalization = "openai"
    c.data.text_type = "mixed"  # BioCLIP's text types where ranks are known; finetune picks "com" for class names
    c.data.crop_scale = (0.8, 1.0)
    c.log_every_steps = 10
    c.train.trainable = "all"  # "all" (full CLIP), "vision" (text tower frozen) or "lora"
    c.train.lora_rank = 8
    c.train.distinct_captions = True  # a batch of few classes: images sharing a caption are no negatives (FLYP)
    c.train.global_batch_size = 32
    c.train.steps = 200
    c.train.lr = 1e-5  # pretrained weights: a small step; LoRA trains at 1e-4 (finetune's default)
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.1
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 1
    c.eval.every_steps = 0  # finetune evaluates before and after the run
    return c
