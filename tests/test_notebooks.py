"""The notebooks run top to bottom (small settings, a temporary folder, no network), as CI and Colab run them."""

from __future__ import annotations

import json
import os
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Paths of the machine that ran the notebook have no place in committed outputs.
LOCAL_PATH = re.compile(r"(/tmp/|/work/|/home/|/root/|/Users/|/content/|[A-Z]:\\)")


@pytest.mark.integration  # executes the notebooks
@pytest.mark.parametrize("name", ["quickstart", "train", "finetune"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BIOCLIP_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("BIOCLIP_JAX_RUNS", str(tmp_path))
    # The kernel (a subprocess) imports the checkout under test, not whichever copy is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails (the train notebook
    # asserts its resume step and open_clip parity itself).
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "expected the notebook's figure"


@pytest.mark.parametrize("name", ["quickstart", "train", "finetune"])
def test_notebook_reads_well_on_github(name):
    """Committed with the outputs of a real run, kept small: no giant cells or outputs."""
    nbformat = pytest.importorskip("nbformat")
    path = NOTEBOOKS / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert path.stat().st_size < 400_000, f"{path} is {path.stat().st_size} bytes"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert sum(bool(cell.outputs) for cell in code) >= len(code) - 2, "committed without the outputs of a run"
    assert max(len(cell.source.splitlines()) for cell in notebook.cells) <= 30
    for cell in code:
        for output in cell.outputs:
            assert len(output.get("text", "")) < 5_000, f"{name}: a {len(output.get('text', ''))}-character output"


def _repository() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


@pytest.mark.parametrize("name", ["quickstart", "train", "finetune"])
def test_notebook_opens_on_colab(name):
    """A README badge opens it on Colab; its first cell clones the repository named in pyproject.toml and installs
    it, the next one installs JAX's accelerator build on GPU and TPU runtimes; figures are readable."""
    repository = _repository()
    assert repository.startswith("https://github.com/")
    badge = (f"https://colab.research.google.com/github/{repository.removeprefix('https://github.com/')}/blob/main/"
             f"notebooks/{name}.ipynb")
    assert badge in (ROOT / "README.md").read_text()
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    assert f'REPOSITORY = "{repository}"' in code[0] and '"git", "clone"' in code[0] and "pip" in code[0]
    assert "jax[cuda12]" in code[1] and "jax[tpu]" in code[1]
    assert all(int(size) >= 10 for source in code for size in re.findall(r"fontsize=(\d+)", source))
    for cell in cells:
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            assert not LOCAL_PATH.search(text), f"{name}: a local path in a committed output: {text[:300]}"
