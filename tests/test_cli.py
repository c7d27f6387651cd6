"""The `bioclip-jax` command line: convert both ways, list models, the demo, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bioclip_jax.cli import main


@pytest.mark.integration  # runs tools/convert_checkpoint.py in a subprocess
def test_convert_both_directions(tmp_path, tiny_open_clip, capsys):
    _, state_dict = tiny_open_clip
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "jax"), "--model", "tiny"]) == 0
    assert "wrote bioclip_jax model folder" in capsys.readouterr().out
    assert json.loads((tmp_path / "jax" / "bioclip_jax_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    # The script form, in a separate process, back to open_clip.
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(tmp_path / "jax"), str(tmp_path / "oc")],
                          capture_output=True, text=True, check=True)
    assert "wrote open_clip model folder" in done.stdout
    back = load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in state_dict.items())
    assert (tmp_path / "oc" / "open_clip_pytorch_model.bin").exists()


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_open_clip, capsys):
    save_file(tiny_open_clip[1], str(tmp_path / "w.safetensors"))
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bioclip-jax convert: error:" in err and "model='ViT-B-16-quickgelu'" in err and "Traceback" not in err
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "out"), "--model", "ViT-B-61"]) == 2
    assert "unknown model 'ViT-B-61'" in capsys.readouterr().err


# Run in a fresh interpreter: what parsing imports, with nothing imported before it.
_PARSE_ONLY = """
import contextlib, io, sys
import bioclip_jax
from bioclip_jax.cli import main
for argv in (["--help"], ["--version"], ["predict", "--help"], ["make-shards", "synthetic", "--help"], ["--bogus"],
             ["embed"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
heavy = ("jax", "jaxlib", "flax", "torch", "numpy", "transformers", "ml_collections", "grain", "orbax", "PIL")
print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
print(sorted(dir(bioclip_jax)))
"""


def test_import_and_parsing_start_no_jax():
    """`import bioclip_jax`, --help, --version and a bad argument import no JAX, torch or numpy (a fast answer); the
    public names are still listed and load on first use."""
    done = subprocess.run([sys.executable, "-c", _PARSE_ONLY], capture_output=True, text=True, check=True)
    imported, listed = done.stdout.strip().splitlines()
    assert imported == "[]"
    import bioclip_jax

    assert set(bioclip_jax.__all__) <= set(eval(listed)) and "load" in bioclip_jax.__all__
    from bioclip_jax.inference.model import load

    assert bioclip_jax.load is load and all(getattr(bioclip_jax, name) for name in bioclip_jax.__all__)
    with pytest.raises(AttributeError, match="no attribute 'loadd'"):
        bioclip_jax.loadd


def test_list_models(capsys):
    """pybioclip's list-models (hub names, then open_clip's architectures, tab-indented; --model: its tags), and our own
    architectures with --architectures."""
    import open_clip

    assert main(["list-models"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"\t{name}" for name in ["hf-hub:imageomics/bioclip", "hf-hub:imageomics/bioclip-2",
                                               *open_clip.list_models()]]
    assert main(["list-models", "--model", "ViT-B-16"]) == 0
    assert capsys.readouterr().out.splitlines() == open_clip.list_pretrained_tags_by_model("ViT-B-16")
    assert main(["list-models", "--architectures"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "ViT-B-16-quickgelu" in listed and "bioclip -> ViT-B-16-quickgelu" in listed


@pytest.mark.integration  # trains and evaluates the demo end to end
def test_demo_runs_end_to_end_with_small_settings(tmp_path, capsys, monkeypatch):
    """The quick-start job's whole path (data, training, per-rank zero-shot, export), shortened."""
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--config.model=tiny", "--config.train.steps=3",
                 "--config.train.global_batch_size=32", "--config.log_every_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "species" in out and "open_clip export" in out
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["zero_shot"]) == {"val", "heldout_species", "hierarchy_consistency"}
    assert report["zero_shot"]["val"]["kingdom"]["chance"] == 0.25
    assert (workdir / "open_clip" / "open_clip_model.safetensors").exists()
    assert report["zero_shot"]["hierarchy_consistency"]["kingdom"] <= 1.0
    assert (workdir / "embeddings_by_kingdom.png").exists() and (workdir / "embeddings_by_phylum.png").exists()
    assert main(["demo", "--workdir", str(workdir), "--config.trian.steps=3"]) == 2  # typo: named, exit code 2
    assert "unknown config key 'trian.steps'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # a training workdir loads by a relative path too
    import bioclip_jax

    assert bioclip_jax.load("demo").source.endswith("(step 3)")
