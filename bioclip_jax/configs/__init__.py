"""Training recipes (ml_collections configs), addressable by name (`--config demo`) or as files. `configs/` at the top
of the repository is a link to this folder: one source of truth, readable where users look for it.

    demo             the quick-start job: a small CLIP on the synthetic tree of life, on a CPU
    bioclip_vitb16   BioCLIP v1: OpenAI CLIP ViT-B/16 (QuickGELU) fine-tuned on TreeOfLife-10M
    bioclip2_vitl14  BioCLIP 2: ViT-L/14 on TreeOfLife-200M, FSDP
"""
