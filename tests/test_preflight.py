"""The trainer's checks before compiling (captions, batch, intervals), its init-weights advice and its one-line
out-of-memory error, as a user meets them (issue 22: a 42-image folder trained with a recipe's defaults)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from bioclip_jax.cli import main
from bioclip_jax.convert.files import write_open_clip_folder
from bioclip_jax.convert.state_dict import expected_state_dict_shapes
from bioclip_jax.data.records import Record, ShardWriter
from bioclip_jax.data.taxonomy import Taxon
from bioclip_jax.errors import InputError, ResourceError
from bioclip_jax.inference.tree_of_life import load_txt_emb
from bioclip_jax.models.config import get_model_config
from bioclip_jax.train import preflight, trainer
from bioclip_jax.train.config import load_config
from bioclip_jax.train.trainer import train

CONFIG = Path(__file__).parent / "configs" / "tiny_train.py"
SPECIES = ["Pica hudsonia", "Corvus corax", "Cyanocitta cristata", "Turdus migratorius", "Sitta carolinensis",
           "Poecile atricapillus"]


def _shards(folder: Path, n: int, taxonomy: bool) -> Path:
    """n records of 6 species; without taxonomy they carry only the class label (a filepath,class CSV's shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, "JPEG")
    with ShardWriter(folder / "t-00000.array_record") as writer:
        for i in range(n):
            name = SPECIES[i % len(SPECIES)]
            ranks = ["Animalia", "", "", "", "", *name.split()] if taxonomy else [""] * 7
            writer.write(Record(f"r{i}", buf.getvalue(), Taxon.from_ranks(ranks), label=name))
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return _shards(tmp_path_factory.mktemp("labelled"), 42, taxonomy=True)


def _config(shards, *overrides):
    return load_config(CONFIG, [f"data.train={shards}", *overrides])


def test_records_without_taxonomy_are_refused_naming_what_is_missing(tmp_path):
    shards = _shards(tmp_path / "class_only", 42, taxonomy=False)
    with pytest.raises(InputError, match=r"none of the 42 records read has a taxonomy \(kingdom\.\.species and "
                                         r"common_name are all empty\), so every caption would be 'a photo of \.'.*"
                                         r"class labels \('Pica hudsonia', 'Corvus corax', 'Cyanocitta cristata'\)"):
        train(_config(shards), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_some_records_without_taxonomy_are_a_warning(tmp_path, caplog):
    shards = _shards(tmp_path / "class_only", 6, taxonomy=False)
    with ShardWriter(shards / "t-00001.array_record") as writer:
        writer.write(Record("named", b"", Taxon.from_ranks(["Animalia"] + [""] * 6)))
    source = preflight.pipeline.open_source(shards)
    with caplog.at_level(logging.WARNING):
        preflight.check_captions(source, "split", "mixed")
    assert "6 of 7 records read have no name of text type sci/com/taxon/sci_com/taxon_com" in caplog.text
    # A record named by its common name only has a caption under "com", none under "sci".
    common_only = [Record("c", b"", Taxon.from_ranks([""] * 7, "magpie")).to_bytes()]
    preflight.check_captions(common_only, "split", "com")
    with pytest.raises(InputError, match="none of the 1 records read"):
        preflight.check_captions(common_only, "split", "sci")


def test_a_global_batch_over_the_split_is_refused_with_one_that_works(labelled, tmp_path):
    # The run: the recipe's batch (32768) and 100 epochs on 42 images planned "1 steps".
    config = _config(labelled, "train.global_batch_size=32768", "train.epochs=100.0")
    with pytest.raises(InputError, match=r"train\.global_batch_size=32768 is larger than the training split \(42 "
                                         r"images in .*set --config\.train\.global_batch_size=32 "):
        train(config, tmp_path / "run", progress=False)
    assert preflight.working_batch(42, _config(labelled, "train.accum_steps=3")) == 42 // 3 * 3
    assert preflight.working_batch(42, _config(labelled)) == 32
    preflight.check_batch(_config(labelled, "train.global_batch_size=42"), 42)  # the whole split: allowed


def test_intervals_beyond_the_run_are_warnings_naming_a_value_that_works(labelled):
    config = _config(labelled, "train.warmup_steps=1000", "eval.every_steps=2000", "checkpoint.every_steps=500")
    warnings = preflight.interval_warnings(config, total_steps=131)
    assert warnings == [
        "train.warmup_steps=1000 is at or beyond the run's 131 steps: the learning rate rises to 0.000131 at most "
        "(train.lr=0.001) and never decays; --config.train.warmup_steps=13 warms up over a tenth of the run",
        "eval.every_steps=2000 is beyond the run's 131 steps: no validation would run during training; "
        "--config.eval.every_steps=32 validates 4 times",
        "checkpoint.every_steps=500 is beyond the run's 131 steps: only the last step is saved (a crash before it "
        "loses the run); --config.checkpoint.every_steps=32 saves every 32 steps"]
    # Without an evaluation wired, no validation is promised; within the run, nothing is said.
    assert len(preflight.interval_warnings(config, total_steps=131, evaluates=False)) == 2
    fixed = _config(labelled, "train.warmup_steps=13", "eval.every_steps=32", "checkpoint.every_steps=32")
    assert preflight.interval_warnings(fixed, total_steps=131) == []


def test_an_init_of_another_architecture_names_the_key_that_works(tmp_path):
    tiny = get_model_config("tiny")
    state_dict = {k: np.zeros(shape, np.float32) for k, shape in expected_state_dict_shapes(tiny).items()}
    folder = write_open_clip_folder(tmp_path / "tiny", state_dict, tiny, {}, write_bin=False)
    model_config = get_model_config("demo")
    # A folder carries its own config: the recipe's init_model (for bare files) does not apply; config.model does.
    recipe = load_config(CONFIG, ["model=demo", f"init={folder}", "init_model=ViT-B-16-quickgelu"])
    with pytest.raises(InputError, match=r"are a tiny model \(their own config\), but config.model is 'demo': "
                                         r"fine-tune their architecture with --config.model=tiny$"):
        preflight.load_init(recipe, model_config)
    fixed = load_config(CONFIG, ["model=tiny", f"init={folder}", "init_model=ViT-B-16-quickgelu"])
    assert preflight.load_init(fixed, get_model_config("tiny")).config.to_open_clip() == tiny.to_open_clip()
    # A bare weights file is read as init_model: tensors that do not fit it name the architectures they fit.
    bare = load_config(CONFIG, [f"init={folder / 'open_clip_model.safetensors'}", "init_model=ViT-B-16-quickgelu"])
    with pytest.raises(InputError, match=r"without a config\) do not fit config\.init_model='ViT-B-16-quickgelu'; they "
                                         r"fit tiny: --config\.init_model=tiny --config\.model=tiny$"):
        preflight.load_init(bare, get_model_config("tiny"))
    bare_ok = load_config(CONFIG, [f"init={folder / 'open_clip_model.safetensors'}"])  # default: config.model
    assert preflight.load_init(bare_ok, get_model_config("tiny")).config.to_open_clip() == tiny.to_open_clip()


def test_out_of_memory_outside_the_step_is_one_line_and_exit_1(labelled, tmp_path, monkeypatch, capsys):
    # On the run the step's allocation failed only when the first log line read its metrics (JAX dispatches
    # asynchronously: jax.device_get in _log_line), outside the step's own try: a 12-frame traceback. Every path of a
    # run is now covered; injected here where the state is first allocated (before any step compiles, so it is fast).
    def out_of_memory(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 33436033552 bytes.")

    monkeypatch.setattr(trainer, "_restore_or_init", out_of_memory)
    code = main(["train", "--config", str(CONFIG), "--workdir", str(tmp_path / "run"),
                 f"--config.data.train={labelled}", "--config.train.steps=1", "--config.train.warmup_steps=1",
                 "--config.data.workers=0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "bioclip-jax train: error: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 31.1 GiB.) "
        "with 16 images per device (global batch 16 over 1 device(s), accum_steps 1), model tiny, dtype float32, "
        "remat off, fsdp False. Try, in this order: --config.remat=dots (or full: recompute activations); "
        "--config.dtype=bfloat16; --config.train.accum_steps=2 (same global batch, smaller micro-batches); "
        "--config.train.global_batch_size=8. `bioclip-jax plan` checks a config's memory without a run"]


def test_memory_errors_translates_only_out_of_memory(labelled):
    config = _config(labelled, "remat=full", "dtype=bfloat16", "train.global_batch_size=1")
    with pytest.raises(ResourceError, match=r"Try, in this order: --config\.train\.global_batch_size=1\. "):
        with preflight.memory_errors(config):
            try:
                raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in hbm")
            except RuntimeError as e:
                raise ValueError("while compiling the step") from e  # found through the cause
    with pytest.raises(KeyError):
        with preflight.memory_errors(config):
            raise KeyError("anything else keeps its type")


def test_make_txt_emb_keeps_one_column_per_taxon_in_order_of_first_appearance(tmp_path, capsys):
    # The CSV: one row per image (8 per species), as make-shards reads it; each species was written 8 times
    # and its top score split to ~1/8.
    rows = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", *name.split(), "")
            for name in SPECIES for _ in range(8)]
    rows.insert(3, ("animalia", "chordata", "aves", "passeriformes", "corvidae", "pica", "hudsonia", ""))  # same
    rows.append(("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia", "magpie"))  # not
    taxa_csv = tmp_path / "taxa.csv"
    taxa_csv.write_text("kingdom,phylum,class,order,family,genus,species,common_name\n"
                        + "".join(",".join(r) + "\n" for r in rows))
    tiny = get_model_config("tiny")
    rng = np.random.default_rng(0)
    state_dict = {k: rng.normal(0, 0.02, shape).astype(np.float32)
                  for k, shape in expected_state_dict_shapes(tiny).items()}
    folder = write_open_clip_folder(tmp_path / "tiny", state_dict, tiny, {}, write_bin=False)
    assert main(["make-txt-emb", str(taxa_csv), "--model", str(folder), "--out", str(tmp_path / "emb")]) == 0
    assert capsys.readouterr().out == f"wrote 7 species embeddings to {tmp_path / 'emb'} (43 repeated rows merged: " \
                                      "one column per taxon)\n"
    matrix, taxa = load_txt_emb(tmp_path / "emb")
    assert matrix.shape == (64, 7)
    assert [f"{t.genus} {t.species}" for t in taxa] == SPECIES + ["Pica hudsonia"]
    assert [t.common_name for t in taxa] == [""] * 6 + ["magpie"]


def test_a_validation_split_that_does_not_open_is_refused_before_training(labelled, tmp_path):
    # The recipe's default data.val (shards/treeoflife-10m/val) failed only at the first evaluation, after compiling.
    config = _config(labelled, "data.val=shards/treeoflife-10m/val", "eval.every_steps=1")
    with pytest.raises(InputError, match=r"data\.val='shards/treeoflife-10m/val' \(validated every "
                                         r"eval\.every_steps=1 steps\): no \.array_record shards found at .*; pass "
                                         r"--config\.data\.val=PATH, or --config\.data\.val= for no validation$"):
        preflight.check(config, 6, evaluates=True)
    preflight.check(config, 6, evaluates=False)  # no evaluation wired: not read
    preflight.check(_config(labelled, f"data.val={labelled}", "eval.every_steps=1"), 6)
