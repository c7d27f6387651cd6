"""The config mechanism: recipes by name or path, `--config.KEY=VALUE` overrides with literal coercion."""

from __future__ import annotations

import pytest

from bioclip_jax.errors import InputError
from bioclip_jax.train.config import apply_override, base_config, config_names, load_config


def test_recipes_load_by_name_by_file_name_and_by_path(tmp_path, monkeypatch):
    assert config_names() == ["bioclip2_vitl14", "bioclip_vitb16", "demo", "finetune"]
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names resolve to the packaged recipes
    for name in ("demo", "demo.py", "configs/demo.py"):
        assert load_config(name).model == "demo"
    assert load_config("bioclip_vitb16").model == "ViT-B-16-quickgelu"
    own = tmp_path / "mine.py"
    own.write_text("from bioclip_jax.train.config import base_config\n\n"
                   "def get_config():\n    c = base_config()\n    c.model = 'tiny'\n    return c\n")
    assert load_config(str(own)).model == "tiny"
    with pytest.raises(InputError, match="not a recipe name .recipes: bioclip2_vitl14, bioclip_vitb16, demo"):
        load_config("bioclip_vitb61")
    with pytest.raises(InputError, match="no such file"):
        load_config("elsewhere/demo.py")  # a path that does not exist is not silently a recipe


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=3e-4", ("train", "lr"), 3e-4),
    ("train.lr=1", ("train", "lr"), 1.0),  # an int for a float key stays a float
    ("train.steps=7", ("train", "steps"), 7),
    ("train.fsdp=True", ("train", "fsdp"), True),
    ("data.crop_scale=[0.5, 1.0]", ("data", "crop_scale"), (0.5, 1.0)),  # a list for a tuple key becomes a tuple
    ("data.crop_scale=(0.8, 1.0)", ("data", "crop_scale"), (0.8, 1.0)),
    ("model=ViT-B-16", ("model",), "ViT-B-16"),  # not a literal: the string as given
    ("data.train=gs://bucket/shards/train", ("data", "train"), "gs://bucket/shards/train"),
    ("init='1e-3'", ("init",), "1e-3"),  # quoted: a string even where it would parse as a number
    ("remat=", ("remat",), ""),
])
def test_overrides_coerce_literals(override, key, expected):
    config = base_config()
    apply_override(config, override)
    value = config
    for part in key:
        value = value[part]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("train.lr_max=1", "unknown config key 'train.lr_max'"),
    ("trian.steps=3", "did you mean train"),
    ("train.steps", "expected key=value"),
    ("train.learning_rate=1e-4", r"did you mean train\.lr\?"),  # spelt out: the abbreviation is suggested
    ("learning_rate=1e-4", r"did you mean train\.lr\?"),  # the last part anywhere in the config
    ("lr=1e-4", r"did you mean train\.lr\?"),
    ("trian.steps=3", r"did you mean train, train\.steps\?"),
    ("train.batch_size=64", r"did you mean train\.global_batch_size, eval\.batch_size\?"),
    ("train=3", r"config key 'train' is a group \(accum_steps, .*\): override one of its keys"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(InputError, match=message):
        apply_override(base_config(), override)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "config key 'train.lr' expects a number (now 0.0001), not 'abc'"),
    ("train.global_batch_size=1.5", "config key 'train.global_batch_size' expects an integer (now 32768), not '1.5'"),
    ("train.steps=many", "config key 'train.steps' expects an integer (now 30000), not 'many'"),
    ("train.fsdp=3", "config key 'train.fsdp' expects True or False (now False), not '3'"),
    ("data.crop_scale=5", "config key 'data.crop_scale' expects a tuple such as (0.9, 1.0) (now (0.9, 1.0)), not '5'"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(override, message):
    with pytest.raises(InputError) as raised:
        apply_override(base_config(), override)
    assert str(raised.value) == message  # and nothing of ml_collections' internals ("FieldReference", "casted")
