"""BioCLIP 2 recipe: ViT-L/14 from LAION-2B open_clip weights, TreeOfLife-200M, 30 epochs, global batch 90,112, bf16,
plus 10,240 replay image-text pairs in every batch (100,352 rows a step), as BioCLIP 2's slurm/train.sh.

Replay: `replay.data` (set it: shards of LAION-2B-style pairs, records with a "text" caption; LAION-2B itself was
withdrawn, Re-LAION or DataComp stand in) gives 10,240 rows per step that train through the second visual head
`visual.continual_proj` (a copy of `proj` at the start) in their own CLIP loss, summed with the TreeOfLife loss, one
logit scale; exports leave `continual_proj` out, as BioCLIP 2's release. Captions: text_type "random", one of the
five taxonomic types per step (BioCLIP 2's draw, from the step). FSDP shards params and optimizer state over the data
axis (ViT-L/14 with AdamW is ~5 GB of fp32 state per replica).
Sized for a v5p-64 (32 chips, as BioCLIP 2's 32 GPUs): 3,136 pairs per chip (2,816 TreeOfLife + 320 replay) with
remat full, splash attention and two micro-batches (train.accum_steps: the loss still contrasts the whole global
batch). docs/tpu.md section 4 has the compiled memory, and slices that cost fewer chip-hours.
"""

from bioclip_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "ViT-L-14"
    c.dtype = "bfloat16"
    c.remat = "full"  # the forward is recomputed in the backward, as BioCLIP 2's gradient checkpointing
    c.attn_implementation = "splash"  # TPU flash attention (XLA's elsewhere): no [T, T] scores in HBM
    c.scan_layers = True  # one compiled block per tower (docs/performance.md, "Scan over layers")
    c.require_init = True  # BioCLIP 2 starts from LAION-2B open_clip weights (--config.init=PATH or =scratch)
    c.init_model = "ViT-L-14"
    c.eval.normalization = "openai"
    c.data.train = "shards/treeoflife-200m/train"
    c.data.val = "shards/treeoflife-200m/val"
    c.data.text_type = "random"  # BioCLIP 2's --text_type random: one type per step, drawn from the step
    c.replay.data = "shards/laion-replay/train"  # image-text pairs with "text" captions: set --config.replay.data
    c.replay.per_batch = 10240  # 320 per GPU x 32 in BioCLIP 2; a multiple of the chips along the batch
    c.replay.text_type = "text"  # the pairs' own captions (BioCLIP 2: --continual_text_type '')
    c.replay.continual_proj = True
    c.train.global_batch_size = 90112
    c.train.epochs = 30  # over the training split, counted at start
    c.train.steps = 0
    c.train.fsdp = True
    c.train.accum_steps = 2  # two micro-batches of 1,568 per chip: 3,136 in one needs ~130 GiB (docs/tpu.md)
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 2000
    return c
