"""The notebooks run top to bottom on the embedded model; any cell error fails the test. The
steering notebook's baseline generations must be the model's own text: those of a decode by
plain full forward passes with the same seeds."""

import ast
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
from nbclient import NotebookClient
from test_generation import reference_decode
from test_steering import small_smollm2_run

from interp.steering import GenerateConfig

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def run_notebook(name, tmp_path_factory, monkeypatch):
    # The notebooks load one small coder trained once per session, and read few tokens.
    monkeypatch.setenv("INTERP_NOTEBOOK_RUN", str(small_smollm2_run(tmp_path_factory.getbasetemp())))
    monkeypatch.setenv("INTERP_NOTEBOOK_TOKENS", "3000")
    monkeypatch.setenv("INTERP_NOTEBOOK_PROMPTS", "16")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The python3 kernel of the interpreter running the tests, whatever kernels are installed.
    client = NotebookClient(book, timeout=600, kernel_name=NATIVE_KERNEL_NAME, resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}})
    client.execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_explore_features_notebook_runs(tmp_path_factory, monkeypatch):
    run_notebook("explore_features.ipynb", tmp_path_factory, monkeypatch)


@pytest.mark.slow
def test_steering_notebook_runs_and_its_baseline_is_the_models_text(smollm2, tmp_path_factory, monkeypatch):
    printed = run_notebook("steering.ipynb", tmp_path_factory, monkeypatch)
    baselines = [ast.literal_eval(line.removeprefix("baseline:").strip()) for line in printed.splitlines() if line.startswith("baseline:")]
    # The notebook's prompt and settings.
    prompt_ids = smollm2.to_tokens("My favourite thing to do on the weekend is")[0].tolist()
    cfg = GenerateConfig(max_new_tokens=12, samples=2, seed=0)
    expected = [smollm2.tokenizer.decode(reference_decode(smollm2, prompt_ids, cfg, cfg.seed + i)) for i in range(cfg.samples)]
    assert baselines == expected


@pytest.mark.slow
def test_circuits_notebook_runs_and_checks_the_model_does_ioi(tmp_path_factory, monkeypatch):
    printed = run_notebook("circuits.ipynb", tmp_path_factory, monkeypatch)
    assert "ioi: accuracy" in printed and "faithfulness" in printed and "interactive graph:" in printed
    assert "strongest query heads:" in printed and "supervised: sufficiency" in printed and "codebook: sufficiency" in printed
