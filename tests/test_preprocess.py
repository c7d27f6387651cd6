"""Host preprocessing equals open_clip's eval transform exactly, and pybioclip's Tree-of-Life transform closely."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image
from torchvision import transforms

from bioclip_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

SHAPES_AND_MODES = [(300, 400, "RGB"), (100, 80, "RGB"), (224, 224, "RGB"), (500, 231, "RGBA"), (600, 601, "L"),
                    (150, 700, "P"), (120, 90, "CMYK"), (1000, 1333, "RGB"), (50, 30, "RGB"), (224, 225, "LA")]


def _image(h, w, mode, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("h,w,mode", SHAPES_AND_MODES)
def test_eval_transform_is_open_clips(h, w, mode):
    image = _image(h, w, mode)
    expected = open_clip.image_transform(224, is_train=False)(image).numpy().transpose(1, 2, 0)
    assert np.array_equal(Preprocess()(image), expected)


def test_imagenet_statistics_and_other_sizes():
    image = _image(333, 250, "RGB")
    ours = Preprocess(size=336, mean=IMAGENET_MEAN, std=IMAGENET_STD)(image)
    theirs = open_clip.image_transform(336, is_train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)(image)
    assert np.array_equal(ours, theirs.numpy().transpose(1, 2, 0))


def test_open_clip_squash_mode():
    image = _image(300, 170, "RGB")
    theirs = open_clip.image_transform(224, is_train=False, resize_mode="squash")(image)
    assert np.array_equal(Preprocess(resize_mode="squash")(image), theirs.numpy().transpose(1, 2, 0))


@pytest.mark.parametrize("h,w,mode", SHAPES_AND_MODES)
def test_pybioclip_tree_of_life_transform(h, w, mode):
    # pybioclip's preprocess_img: ToTensor, Resize((224, 224), antialias=True), Normalize(OpenAI), on RGB.
    pybioclip = transforms.Compose([transforms.ToTensor(), transforms.Resize((224, 224), antialias=True),
                                    transforms.Normalize(Preprocess().mean, Preprocess().std)])
    image = _image(h, w, mode)
    expected = pybioclip(image.convert("RGB")).numpy().transpose(1, 2, 0)
    assert np.abs(Preprocess().pybioclip_squash()(image) - expected).max() < 1e-4


def test_open_clip_preprocess_cfg_round_trip():
    cfg = Preprocess(size=336, mean=IMAGENET_MEAN, std=IMAGENET_STD).to_open_clip()
    assert Preprocess.from_open_clip(cfg, 224) == Preprocess(size=336, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(ValueError, match="resize_mode='longest'"):
        Preprocess(resize_mode="longest")
