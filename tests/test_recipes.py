"""The BioCLIP recipes as the paper ran them: pretrained init required, epochs over the training split, OpenAI
statistics for evaluation and export while training on ImageNet's."""

from __future__ import annotations

import json

import pytest
from test_train import shards  # noqa: F401 - the shards fixture (64 records)

import bioclip_jax
from bioclip_jax.data.transforms import IMAGENET_MEAN, OPENAI_MEAN
from bioclip_jax.errors import InputError
from bioclip_jax.train.config import load_config
from bioclip_jax.train.trainer import train

SMALL = ["model=tiny", "dtype=float32", "remat=", "train.global_batch_size=16", "train.warmup_steps=1",
         "checkpoint.async_save=False", "checkpoint.every_steps=2", "log_every_steps=1", "data.workers=0"]


def test_the_bioclip_recipe_refuses_to_start_from_random_weights_unless_asked(shards, tmp_path):  # noqa: F811
    config = load_config("bioclip_vitb16", [f"data.train={shards}", "data.val=", *SMALL])
    with pytest.raises(InputError, match="--config.init=PATH .* or --config.init=scratch"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "bioclip_jax_run.json").exists()


@pytest.mark.integration  # trains the recipe end to end
def test_epochs_count_the_training_split_and_export_uses_openai_statistics(shards, tmp_path):  # noqa: F811
    config = load_config("bioclip_vitb16", [f"data.train={shards}", "data.val=", "init=scratch", "train.epochs=0.5",
                                            *SMALL])
    result = train(config, tmp_path / "run", progress=False)
    assert result.step == 2  # 0.5 epochs x 64 images / batch 16
    run = json.loads((tmp_path / "run" / "bioclip_jax_run.json").read_text())
    assert run["train_normalization"]["name"] == "imagenet" and tuple(run["train_normalization"]["mean"]) == \
        IMAGENET_MEAN
    assert tuple(run["preprocess_cfg"]["mean"]) == OPENAI_MEAN  # evaluation and export, as BioCLIP's release
    assert bioclip_jax.load(tmp_path / "run").preprocess.mean == OPENAI_MEAN
    exported = bioclip_jax.export_open_clip(result.model(), tmp_path / "oc", write_bin=False)
    assert tuple(json.loads((exported / "open_clip_config.json").read_text())["preprocess_cfg"]["mean"]) == OPENAI_MEAN
    keep = load_config("bioclip_vitb16", [f"data.train={shards}", "init=scratch", "eval.normalization=imagenet",
                                          "train.steps=1", "train.epochs=0", *SMALL])
    assert train(keep, tmp_path / "keep", progress=False).preprocess.mean == IMAGENET_MEAN  # the one flag
