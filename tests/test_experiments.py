"""The research scripts of experiments/: the synthetic-lesion harness runs end to end on a tiny demo
set and finds its lesions, two probes run there too, every script keeps its command line, and
none uses a private name of utils."""

from __future__ import annotations

import ast
import importlib
import math
import pathlib
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from scipy import ndimage

from experiments import global_probe, harmonise_probe, image_score_probe, synthetic_val, threshold_probe
from utils.data.demo.brains import DemoCounts, generate_demo

EXPERIMENTS = pathlib.Path(ROOT) / "experiments"
SCRIPTS = sorted(path.stem for path in EXPERIMENTS.glob("*.py") if path.stem not in ("__init__", "common"))
VAL_IMAGES, DRAWS = 4, 3


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> str:
    """A config of the demo set at 64 px with 10 channels, aligned, z-scored and background-masked
    (every place where the data path's head estimate reaches the model)."""
    folder = tmp_path_factory.mktemp("experiments")
    root = generate_demo(folder / "demo", counts=DemoCounts(ixi_train=1, fastmri_train=8, val=VAL_IMAGES, per_kind=2,
                                                            normal_test=3))
    config = {"image_size": 64, "output_dimension": 10, "device": "cpu", "batch_size": 16, "mask_background": True,
              "data": {"format": "demo", "root": str(root), "train_splits": ["normal_train"], "intensity": "zscore",
                       "align": "translation"}}
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def _numbers(text: str, label: str) -> list[float]:
    """Every number printed right after ``label``."""
    return [float(value) for value in re.findall(re.escape(label) + r" (\S+)", text)]


def _unit(values: list[float]) -> bool:
    return all(math.isfinite(v) and 0 <= v <= 1 for v in values)


# ---------------------------------------------------------------------------- the harness
def test_harness_reports_its_metrics_and_finds_the_lesions(demo_config, capsys):
    synthetic_val.main(["--draws", str(DRAWS), demo_config])
    line = capsys.readouterr().out
    metrics = {name: _numbers(line, name) for name in ("A_auroc", "A_ap", "B_auroc", "C_auroc", "F1", "detected")}
    assert all(len(values) == 1 and _unit(values) for values in metrics.values()), line
    assert f"({VAL_IMAGES * DRAWS} lesioned / {VAL_IMAGES} clean" in line
    # inside the brain, lesion pixels outscore the rest: 0.72 on this set, 0.65-0.77 on demo seeds 1-5,
    # 0.51 when the lesion is not painted (chance)
    assert metrics["B_auroc"][0] > 0.6, line


def test_a_lesion_box_is_the_bounding_box_of_its_mask():
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 2, 3] = masks[0, 5, 7] = True  # two pixels: the box spans rows 2-5, columns 3-7
    masks[1, 8:10, 1:3] = True
    expected = np.zeros_like(masks)
    expected[0, 2:6, 3:8] = expected[1, 8:10, 1:3] = True
    np.testing.assert_array_equal(synthetic_val.lesion_boxes(masks), expected)


def test_field_numbers_count_the_lesion_box_against_the_brain_outside_it():
    clean = np.arange(100, dtype=np.float64).reshape(1, 10, 10)  # 95..99 above 94: 5 % of the pixels
    lesions = np.zeros((2, 10, 10), dtype=bool)
    lesions[:, 2, 2] = lesions[:, 3, 3] = True  # a diagonal pair: its box is rows and columns 2-3
    sick = np.full((2, 10, 10), 50.0)  # below the threshold: 0 after it
    sick[:, 2:4, 2:4] = 100.0  # box sum 400
    sick[:, 9, 9] = 1000.0  # outside the brain: never counted
    sick[1, 6, 6:8] = 400.0  # 800 outside the box: FP 2, precision 1/3, F1 0.5
    brain = np.ones((2, 10, 10), dtype=bool)
    brain[:, 9, 9] = False
    images = torch.zeros(2, 3, 10, 10)
    synthetic = synthetic_val.SyntheticSet(images[:1], None, torch.ones(1, 10, 10, dtype=torch.bool), images, None,
                                           torch.from_numpy(brain), torch.from_numpy(lesions))
    v = synthetic_val.field_metrics(sick, clean, synthetic)
    assert v == {"field_threshold": 94.0, "field_f1": pytest.approx((1 + 0.5) / 2), "field_detection": 1.0}


def test_a_lesion_changes_the_brain_by_its_contrast_and_nothing_far_from_it():
    size, rng = 96, np.random.default_rng(0)
    rows, cols = np.ogrid[:size, :size]
    brain = (rows - 48) ** 2 + (cols - 48) ** 2 < 40**2
    gray = np.where(brain, 0.5, 0.0).astype(np.float32)
    for _ in range(5):
        image, mask = synthetic_val.lesioned(gray, brain, rng)
        radius = np.sqrt(mask.sum() / np.pi)
        assert 0.04 * size * 0.5 < radius < 0.09 * size * 1.6
        change = abs(float(image[mask].mean()) / 0.5 - 1)
        assert 0.1 < change < 0.55  # 25-45 % brighter or darker, blended at the soft edge
        centre = np.argwhere(mask).mean(axis=0)
        far = np.hypot(rows - centre[0], cols - centre[1]) > 3 * radius
        assert np.abs(image - gray)[far].max() < 1e-3


# ---------------------------------------------------------------------------- the probes
def test_threshold_probe_prints_one_rule_per_percentile_with_rising_thresholds(demo_config, capsys):
    threshold_probe.main(["--draws", "1", demo_config])
    out = capsys.readouterr().out
    thresholds = _numbers(out, "threshold")
    assert len(thresholds) == len(threshold_probe.PERCENTILES), out
    assert thresholds == sorted(thresholds)
    assert _unit(_numbers(out, "val Dice") + _numbers(out, "Dice@val mean")), out


def test_image_score_probe_prints_every_score_as_an_auroc(demo_config, capsys):
    image_score_probe.main(["--draws", "1", demo_config])
    lines = capsys.readouterr().out.strip().splitlines()
    expected = ["max", *(f"top{p:g}" for p in image_score_probe.TOP_PERCENT), "gauss", "max+gauss"]
    assert [line.split("\t")[0] for line in lines] == expected
    assert all(_unit(_numbers(line, "val C") + _numbers(line, "(C) mean")) for line in lines), lines


def test_global_probe_prints_an_auroc_per_change_and_finds_a_ghost(demo_config, capsys):
    global_probe.main([demo_config])  # the demo set has no global test groups: validation only
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["max", *(f"top{p:g}" for p in image_score_probe.TOP_PERCENT),
                                                       "gauss", "max+gauss"]
    for line in lines:
        values = [_numbers(line, name)[0] for name in global_probe.CHANGES]
        assert _unit(values) and _numbers(line, "mean")[0] == pytest.approx(np.mean(values), abs=1e-3), line
    assert _numbers(lines[0], "ghost")[0] > 0.5, "a ghost copy of the head raises the map's maximum"


def test_harmonise_probe_registers_the_ixi_slices_and_trains_on_both_sources(demo_config, capsys):
    harmonise_probe.main(["--register", demo_config])
    validation, test = capsys.readouterr().out.strip().splitlines()
    assert validation.startswith("train 9: val") and test.startswith("train 9: test"), (validation, test)  # 8 + 1 IXI
    names = ("A", "AP", "B", "C", "F1", "detected")
    assert all(len(_numbers(line, name)) == 1 for line in (validation, test) for name in names)
    assert _unit([_numbers(line, name)[0] for line in (validation, test) for name in names])


def test_registration_undoes_an_affine_change_of_the_head():
    rows, cols = np.mgrid[:64, :64]
    head = ((rows - 30) / 24) ** 2 + ((cols - 33) / 19) ** 2 < 1
    fixed = ndimage.gaussian_filter(np.where(head, 0.4 + 0.4 * (rows > 36), 0.0), 1.0).astype(np.float32)
    matrix = np.array([[1.12, 0.06], [-0.04, 0.9]])  # scale, shear and a shift of a few pixels
    moving = ndimage.affine_transform(fixed, matrix, offset=(-3.0, 4.0), order=1)
    before = np.abs(moving - fixed).mean()
    assert np.abs(harmonise_probe.register(moving, fixed) - fixed).mean() < 0.2 * before


def test_each_region_receives_the_intensities_of_its_reference():
    gray = np.arange(12, dtype=np.float32).reshape(3, 4)[::-1].copy()  # the ranks reversed against the rows
    left = np.zeros((3, 4), dtype=bool)
    left[:, :2] = True
    references = (np.array([10.0, 20, 30, 40, 50, 60]), np.array([1.0, 2, 3, 4, 5, 6]))
    out = harmonise_probe.match_regions(gray, (left, ~left), references, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(out[left]), references[0])  # as many pixels as reference values
    np.testing.assert_array_equal(np.sort(out[~left]), references[1])
    assert np.array_equal(np.argsort(out[left]), np.argsort(gray[left]))  # the order inside a region is kept


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_states_its_command_and_parses_it(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    command = f"python experiments/{name}.py"
    assert command in module.__doc__
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command}")


# ---------------------------------------------------------------------------- public names only
def _private_uses(source: str) -> list[str]:
    """Names with a leading underscore that ``source`` takes from utils: imported, or read as an
    attribute of something it imported from utils."""
    tree = ast.parse(source)
    found, from_utils = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            found += [node.module] if any(part.startswith("_") for part in node.module.split(".")) else []
            from_utils |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            from_utils |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("utils")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in from_utils \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_experiments_use_only_public_names_of_utils():
    found = {path.name: _private_uses(path.read_text(encoding="utf-8")) for path in sorted(EXPERIMENTS.glob("*.py"))}
    assert {name: uses for name, uses in found.items() if uses} == {}


def test_the_private_name_check_finds_each_kind():
    source = ("from utils.data.demo.brains import _blob\nfrom utils.padim import align\n"
              "from utils.data._hidden import x\nalign._rotation(1)\nalign.MIN_AREA\n")
    assert _private_uses(source) == ["utils.data.demo.brains._blob", "utils.data._hidden", "align._rotation"]
