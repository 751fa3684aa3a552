"""padim.ipynb runs top to bottom headless on a small demo set and produces the table, figures and files."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
import yaml

from conftest import ROOT

REQUIRED_COLUMNS = ["group", "n_images", "A_auroc", "A_ap", "B_auroc", "B_ap", "C_auroc", "dice_best"]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """Execute a copy of padim.ipynb with PADIM_CONFIG/PADIM_SOURCES pointing at a temporary folder."""
    from utils.data.demo.brains import DemoCounts, generate_demo

    folder = tmp_path_factory.mktemp("notebook")
    root = generate_demo(folder / "demo", counts=DemoCounts(ixi_train=16, fastmri_train=8, val=4, per_kind=3, normal_test=4))
    config = folder / "config.yaml"
    with open(os.path.join(ROOT, "config.yaml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    raw.update(image_size=64, output_dimension=32, target_dimension=None, device="cpu", batch_size=16,
               results_dir=str(folder / "results"))
    raw["data"].update(format="demo", root=str(root))
    config.write_text(yaml.safe_dump(raw))
    sources = folder / "sources"
    return _execute(config, sources), folder, sources


def _execute(config, sources, notebook=None):
    """Run a copy of padim.ipynb (or ``notebook``, executed in place) with PADIM_CONFIG / PADIM_SOURCES set;
    returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = notebook or nbformat.read(os.path.join(ROOT, "padim.ipynb"), as_version=4)
    previous = {k: os.environ.get(k) for k in ("PADIM_CONFIG", "PADIM_SOURCES")}
    os.environ.update(PADIM_CONFIG=str(config), PADIM_SOURCES=str(sources))
    try:
        client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                         resources={"metadata": {"path": ROOT}})
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


BAD_CONFIGS = [  # (change to config.yaml, the error class the notebook shows)
    ({"batch_size": 0}, "ConfigError"),
    ({"epsilon": "a lot"}, "ConfigError"),
    ({"data": {"format": "mvtec", "root": "{tmp}/no-such-category"}}, "DataError"),
]


@pytest.mark.parametrize("change, error", BAD_CONFIGS)
def test_notebook_shows_a_bad_config_as_one_line(tmp_path, change, error):
    """Like the command line, the notebook shows the package's errors as one line, not a traceback."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    with open(os.path.join(ROOT, "config.yaml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key].update({k: v.replace("{tmp}", str(tmp_path)) for k, v in value.items()})
        else:
            raw[key] = value
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    notebook = nbformat.read(os.path.join(ROOT, "padim.ipynb"), as_version=4)
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        _execute(config, tmp_path / "sources", notebook)
    (shown,) = [o for o in _outputs(notebook) if o.get("output_type") == "error"]
    text = re.sub(r"\x1b\[[0-9;]*m", "", "".join(shown["traceback"])).strip()
    assert len(text.splitlines()) == 1 and text.startswith(f"{error}: "), text


def _outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_notebook_is_committed_thin_and_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(os.path.join(ROOT, "padim.ipynb"), as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code)
    assert all(len(cell.source.splitlines()) <= 15 for cell in code), "cells should stay a few calls each"
    assert notebook.cells[0].cell_type == "markdown"


def test_notebook_runs_and_shows_the_table_and_figures(notebook_run):
    notebook, _, _ = notebook_run
    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    tables = "\n".join(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    assert "A_auroc" in tables and "aupro" in tables and ">mean<" in tables and ">all<" in tables
    for group in ("cyst", "hyperintense_lesion", "mass_oedema"):
        assert group in tables
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # three groups of examples and the AUROC plot


def test_notebook_writes_the_results_files(notebook_run):
    _, folder, sources = notebook_run
    runs = os.listdir(folder / "results")
    assert len(runs) == 1
    run = folder / "results" / runs[0]
    for name in ("metrics.csv", "metrics.md", "config.yaml", "timings.json", "model.pt"):
        assert (run / name).is_file(), name
    table = pd.read_csv(run / "metrics.csv")
    assert list(table.columns[: 2]) == ["group", "n_images"] and set(REQUIRED_COLUMNS) <= set(table.columns)
    assert list(table["group"].iloc[-2:]) == ["mean", "all"] and len(table) == 5
    body = table.iloc[:-2]
    assert ((body[["A_auroc", "B_auroc", "C_auroc"]] >= 0) & (body[["A_auroc", "B_auroc", "C_auroc"]] <= 1)).all().all()
    figures = sorted(os.listdir(sources))
    assert "demo_auroc.png" in figures and len(figures) == 4
    assert all(os.path.getsize(sources / f) < 200_000 for f in figures)
    assert [f for f in os.listdir(run) if f.startswith(".")] == [".padim-files.json"], "no temporary files left behind"
    with open(run / "timings.json") as handle:
        timings = json.load(handle)
    phases = ("load_data_s", "fit_s", "score_s", "metrics_s", "figures_s", "save_s")
    assert timings["total_s"] == pytest.approx(sum(timings[k] for k in phases), abs=2e-3)


def test_command_line_evaluate_writes_the_same_files(notebook_run, capsys):
    from utils.cli import main

    _, folder, _ = notebook_run
    run = folder / "results" / os.listdir(folder / "results")[0]
    before = pd.read_csv(run / "metrics.csv")
    files = sorted(os.listdir(run))
    assert main(["evaluate", "--config", str(folder / "config.yaml"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and str(run.name) in printed
    assert os.listdir(folder / "results") == [run.name], "the same config maps to the same run folder"
    assert sorted(os.listdir(run)) == files
    after = pd.read_csv(run / "metrics.csv")
    pd.testing.assert_frame_equal(before, after, atol=1e-4, check_exact=False)


def test_command_line_evaluate_can_skip_figures_and_model(notebook_run, tmp_path, capsys):
    from utils.cli import main

    _, folder, _ = notebook_run
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")  # not part of the run name: same run, other folder
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--config", str(config), "--quiet", "--no-figures", "--no-save-model"]) == 0
    assert "mean" in capsys.readouterr().out
    (run,) = os.listdir(tmp_path / "results")
    assert run == os.listdir(folder / "results")[0]
    assert sorted(os.listdir(tmp_path / "results" / run)) == [".padim-files.json", "config.yaml", "metrics.csv",
                                                              "metrics.md", "timings.json"]
    full = pd.read_csv(folder / "results" / run / "metrics.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / run / "metrics.csv"), full, atol=1e-4, check_exact=False)


def test_notebook_runs_on_nifti_volumes(tmp_path):
    from utils.data.demo.nifti import generate_nifti_demo

    demo = generate_nifti_demo(tmp_path / "nifti", seed=0)
    with open(os.path.join(ROOT, "configs", "nifti_demo.yaml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    raw["results_dir"] = str(tmp_path / "results")
    raw["data"]["manifest"] = os.path.join(demo, "volumes.csv")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    outputs = _outputs(_execute(config, tmp_path / "sources"))
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "slices of" in text and "volumes" in text  # the data summary in slices and volumes
    tables = "\n".join(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    assert ">case<" in tables and "lesion_voxels" in tables and ">mean<" in tables  # per volume and per group
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 4  # AUROC bars, views of three volumes
    (run,) = os.listdir(tmp_path / "results")
    assert {"volumes.csv", "metrics.csv", "metrics.md", "maps"} <= set(os.listdir(tmp_path / "results" / run))
    assert not os.path.exists(tmp_path / "sources"), "figures of non-demo data are never published"
