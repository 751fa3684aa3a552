"""A run's name describes the run (issue 26, class 2): it covers what the split lists and manifests
define, is checked again before the results are swapped in, and a demo set answers only to its seed."""

import contextlib
import os
import shutil
import types

import pandas as pd
import pytest

from utils.config import settings_from_dict
from utils.data import fingerprint
from utils.data.demo.brains import DemoCounts, generate_demo
from utils.data.demo.nifti import generate_nifti_demo
from utils.errors import DataError
from utils.evaluation import Run


def _rewrite(root, name, change):
    """The CSV ``name`` below ``root`` rewritten as ``change(frame)``, with a later modification time."""
    path = os.path.join(root, name)
    change(pd.read_csv(path, keep_default_na=False)).to_csv(path, index=False, lineterminator="\n")
    later = os.stat(path).st_mtime + 100  # whole seconds enter the fingerprint: make the edit visible to it
    os.utime(path, (later, later))


def move_row_to_another_group(root):
    """The last cyst row (image, box, brain-minus-box) becomes a hyperintense_lesion row."""
    for suffix in ("", "_ann", "_neg"):
        source, target = (f"data/splits/{group}{suffix}.csv" for group in ("cyst", "hyperintense_lesion"))
        row = pd.read_csv(os.path.join(root, source), keep_default_na=False).tail(1)
        _rewrite(root, target, lambda frame: pd.concat([frame, row]))
        _rewrite(root, source, lambda frame: frame.head(-1))


def regroup_a_test_volume(manifest):
    test = manifest.index[manifest["split"] == "test"]
    manifest.loc[test[0], "group"] = manifest.loc[test[-1], "group"]
    return manifest


def swap_two_labels(manifest):
    first, third = manifest.index[manifest["label"] != ""][[0, 2]]  # every other volume is stored oblique: same grids
    manifest.loc[[first, third], "label"] = manifest.loc[[third, first], "label"].to_numpy()
    return manifest


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity")
    counts = DemoCounts(ixi_train=4, fastmri_train=4, val=2, per_kind=2, normal_test=2)
    return {"demo": generate_demo(folder / "demo", counts=counts), "nifti": generate_nifti_demo(folder / "nifti")}


def _copy(source, tmp_path, fmt="demo"):
    """A copy of ``source`` in ``tmp_path/data`` (times kept: the same fingerprint) and settings to read it."""
    root = str(shutil.copytree(source, tmp_path / "data", copy_function=shutil.copy2))
    data = {"format": "demo", "root": root} if fmt == "demo" else {"format": "nifti", "manifest": f"{root}/volumes.csv"}
    return root, settings_from_dict({"image_size": 64, "output_dimension": 16, "device": "cpu",
                                     "results_dir": str(tmp_path / "results"), "data": data})


@pytest.mark.parametrize("fmt, edit, seed, expected", [
    ("demo", move_row_to_another_group, 0, True),
    ("demo", lambda root: _rewrite(root, "data/splits/cyst.csv", lambda rows: rows), 0, False),  # the same rows
    ("nifti", lambda root: _rewrite(root, "volumes.csv", regroup_a_test_volume), 0, True),
    ("nifti", lambda root: _rewrite(root, "volumes.csv", swap_two_labels), 0, True),
    ("demo", lambda root: None, 7, "holds the demo set of seed 0, not data.demo_seed 7"),
    ("demo", lambda root: os.remove(os.path.join(root, "data", "demo.json")), 0, "holds the demo set of seed unknown"),
], ids=["moved-row", "same-rows", "moved-volume", "other-labels", "other-seed", "no-seed"])
def test_the_run_name_follows_what_the_lists_define_and_a_demo_set_answers_only_to_its_seed(sets, tmp_path, fmt, edit,
                                                                                           seed, expected):
    """True: another name after the edit; False: the same; a str: its error (another image's study mask: test_data)."""
    root, settings = _copy(sets[fmt], tmp_path, fmt)
    before = Run(settings)
    before.load_data()
    edit(root)
    after = Run(settings.replace(data={"demo_seed": seed}))
    with pytest.raises(DataError, match=expected) if isinstance(expected, str) else contextlib.nullcontext():
        after.load_data()
        assert (after.name != before.name) == expected


def test_data_changed_during_the_run_writes_nothing(sets, tmp_path):
    run = Run(_copy(sets["demo"], tmp_path)[1])
    run.load_data()
    run.fit(progress=False)
    run.score(progress=False)
    run.compute_metrics()
    image = run.bundle.test["cyst"].paths[0]
    later = os.stat(image).st_mtime + 100
    os.utime(image, (later, later))  # rewritten while the run was scoring
    with pytest.raises(DataError, match="the data changed while run"):
        run.save(figures=False)
    assert not os.path.exists(run.directory)
    assert not os.listdir(tmp_path / "results"), "no staging folder left behind"


def test_a_file_name_that_is_not_utf8_has_a_fingerprint(tmp_path):
    odd = os.path.join(os.fsencode(tmp_path), b"\xff1.png")
    open(odd, "wb").close()
    (tmp_path / "2.png").write_bytes(b"y")
    listed = types.SimpleNamespace(rows=[(os.fsdecode(odd),), (str(tmp_path / "2.png"),)])
    assert len(fingerprint([listed])) == 12
