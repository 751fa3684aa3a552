"""The generated demo set: layout read by the study loader, scanner look, determinism, atomic
writing, the command line, and PaDiM (efficientnet_lite0, 128 px) finding its lesions."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from utils import demo_data
from utils.data.demo import brains
from utils.config import load_config, settings_from_dict
from utils.data import NORMAL, Loader, load_data
from utils.data.demo.brains import KINDS, DemoCounts, generate_demo
from utils.data.demo.mvtec import generate_mvtec
from utils.errors import DataError

TINY = DemoCounts(ixi_train=2, fastmri_train=2, val=1, per_kind=2, normal_test=2, second_lesion=0.5)


def _rows(root, name):
    with open(os.path.join(root, "data", "splits", name + ".csv"), newline="") as handle:
        return [os.path.join(root, r["filename"]) for r in csv.DictReader(handle)]


def _read(path):
    return np.asarray(Image.open(path))


def _digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test machine's 2 cores are shared: one intra-op thread avoids OpenMP oversubscription
    (measured 7x faster fit+score under load than two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("tiny") / "demo", seed=3, counts=TINY)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The full default demo set, generated on first use by load_data (format demo)."""
    root = str(tmp_path_factory.mktemp("full") / "demo")
    settings = load_config(os.path.join(ROOT, "config.yaml")).replace(device="cpu", data={"root": root})
    return settings, load_data(settings)


def test_layout_is_the_studys_and_the_study_loader_reads_it(tiny):
    for folder in ("data/IXI", "data/fastMRI/brain_mid_png", "data/fastMRI/brain_mid_anno_pos_png",
                   "data/fastMRI/brain_mid_anno_neg_png", "data/splits"):
        assert os.path.isdir(os.path.join(tiny, folder))
    settings = settings_from_dict({"image_size": 64, "device": "cpu", "data": {"format": "study", "root": tiny}})
    bundle = load_data(settings)
    assert len(bundle.train) == 4 and len(bundle.val) == 1
    assert list(bundle.test) == sorted(KINDS) + [NORMAL]
    for kind in KINDS:
        images, boxes, negs = (_rows(tiny, kind + suffix) for suffix in ("", "_ann", "_neg"))
        assert len(images) == len(boxes) == len(negs) == len(bundle.test[kind]) >= TINY.per_kind
        assert len(set(images)) == TINY.per_kind
        for image, box in zip(images, boxes):  # naming convention <slice>_<kind>_<k>.png
            stem = os.path.splitext(os.path.basename(image))[0]
            assert os.path.basename(box).startswith(f"{stem}_{kind}_")
        assert all(p.startswith(os.path.join(tiny, "./data/fastMRI/brain_mid_png")) for p in images)
    assert all("/data/IXI/" in p for p in _rows(tiny, "ixi_normal_train"))


def test_masks_are_consistent(tiny):
    for kind in KINDS:
        images, boxes, negs = (_rows(tiny, kind + suffix) for suffix in ("", "_ann", "_neg"))
        for image in dict.fromkeys(images):
            head = _read(image.replace(".png", "_brain_map_full.png")) > 0
            mine = [_read(b) > 0 for i, b in zip(images, boxes) if i == image]
            union = np.logical_or.reduce(mine)
            neg = _read(negs[images.index(image)]) > 0
            assert all(m.any() and not (m & ~head).any() for m in mine)  # boxes lie inside the head
            # each box is an axis-aligned rectangle
            for m in mine:
                r, c = np.nonzero(m)
                assert m.sum() == (r.max() - r.min() + 1) * (c.max() - c.min() + 1)
            np.testing.assert_array_equal(neg, head & ~union)  # neg = head minus every box of the slice


def test_scanners_differ_like_ixi_and_fastmri(tiny):
    for path in _rows(tiny, "ixi_normal_train"):
        image = _read(path)
        assert image.shape == (233, 197) and image.dtype == np.uint8
        assert (image == 0).mean() > 0.1  # exact-zero background
        assert 150 < np.median(image[image > 40]) < 230
    for path in _rows(tiny, "normal_test"):
        image = _read(path)
        head = _read(path.replace(".png", "_brain_map_full.png")) > 0
        assert image.shape in ((320, 320), (320, 270))
        assert 15 < image[~head].mean() < 50 and image[~head].std() > 2  # noisy, non-zero background
        assert 100 < np.median(image[head]) < 190


def test_lesions_change_the_image_where_the_boxes_are(tiny):
    """A lesion stands out from the tissue around it: the box differs from a ring around it."""
    for kind in KINDS:
        for image_path, box_path in zip(_rows(tiny, kind), _rows(tiny, kind + "_ann")):
            image, box = _read(image_path).astype(float), _read(box_path) > 0
            normal_rows = _rows(tiny, "normal_test")
            reference = _read(normal_rows[0]).astype(float)
            inside = image[box]
            if kind == "cyst":
                assert np.percentile(inside, 10) < 0.5 * np.median(image[_read(image_path.replace(".png", "_brain_map_full.png")) > 0])
            elif kind == "hyperintense_lesion":
                assert np.percentile(inside, 90) > np.percentile(reference[reference > 60], 90)
            assert inside.std() > 10


def test_same_seed_same_bytes_other_seed_other_set(tmp_path, tiny):
    again = generate_demo(tmp_path / "again", seed=3, counts=TINY)
    assert _digest(again) == _digest(tiny)
    # one random stream per image: the first slice depends on the seed, not on the other counts
    one = DemoCounts(ixi_train=1, fastmri_train=1, val=1, per_kind=1, normal_test=1)
    first = "data/IXI/sub-DEMO000_T1w.png"
    same = generate_demo(tmp_path / "same", seed=3, counts=one)
    other = generate_demo(tmp_path / "other", seed=4, counts=one)
    assert open(os.path.join(same, first), "rb").read() == open(os.path.join(tiny, first), "rb").read()
    assert not np.array_equal(_read(os.path.join(other, first)), _read(os.path.join(tiny, first)))


@pytest.mark.parametrize("before, overwrite, replaced", [
    ("empty", False, True), ("user files", False, False), ("user files", True, False),  # --force: never a user's files
    ("demo set", False, False), ("demo set", True, True), ("demo set and user files", True, False),
])
def test_a_folder_is_filled_when_empty_and_replaced_only_when_generated_and_forced(tmp_path, before, overwrite,
                                                                                  replaced):
    root = tmp_path / "root"
    root.mkdir()
    if before == "user files":
        (root / "notes.txt").write_text("mine")
    elif before != "empty":
        generate_demo(root, seed=1, counts=TINY)
        if before == "demo set and user files":
            (root / "notes").mkdir()
            (root / "notes" / "mine.txt").write_text("mine")
    earlier = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    if replaced:
        generate_demo(root, counts=TINY, overwrite=overwrite)
        with open(root / "data" / "demo.json", encoding="utf-8") as handle:
            assert json.load(handle)["seed"] == 0
    else:
        with pytest.raises(FileExistsError, match="not empty|that no demo_data run wrote"):
            generate_demo(root, counts=TINY, overwrite=overwrite)
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == earlier


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = brains._render

    def render_then_interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(brains, "_render", render_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "demo", counts=TINY)
    assert os.listdir(tmp_path) == []  # neither the set nor its temporary folder


def test_load_data_refuses_a_foreign_folder_as_demo_root(tmp_path):
    (tmp_path / "stuff.txt").write_text("x")
    settings = settings_from_dict({"data": {"format": "demo", "root": str(tmp_path)}})
    with pytest.raises(DataError, match="holds no demo set"):
        load_data(settings)


@pytest.mark.parametrize("kind, written", [([], "data/demo.json"), (["--mvtec"], "train/good/000.png")])
def test_command_line(tmp_path, capsys, monkeypatch, kind, written):
    """Every generator alike: an empty folder is filled, a second run is refused, ``--force`` replaces its own set."""
    monkeypatch.setattr(demo_data, "generate_demo", functools.partial(generate_demo, counts=TINY))
    monkeypatch.setattr(demo_data, "generate_mvtec", functools.partial(generate_mvtec, size=32, n_train=2, n_good=1,
                                                                       n_per_defect=1))
    (tmp_path / "cli").mkdir()
    assert demo_data.main(kind + [str(tmp_path / "cli"), "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "written to" in out and os.path.isfile(tmp_path / "cli" / written)
    assert demo_data.main(kind + [str(tmp_path / "cli")]) == 2  # exists and not empty
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty (--force replaces" in err and "\n" not in err
    assert demo_data.main(kind + [str(tmp_path / "cli"), "--force"]) == 0
    for bad in (["--seed", "-1", str(tmp_path / "a")], ["--seed", "x", str(tmp_path / "a")], []):
        with pytest.raises(SystemExit) as info:
            demo_data.main(bad)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert not os.path.exists(tmp_path / "a")


def test_module_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "utils.demo_data", "--seed", "nope", "x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--seed" in result.stderr


def test_default_demo_is_generated_on_first_use_with_planned_counts(demo):
    settings, bundle = demo
    counts = DemoCounts()
    assert len(bundle.train) == counts.ixi_train + counts.fastmri_train
    assert len(bundle.val) == counts.val and len(bundle.test[NORMAL]) == counts.normal_test
    assert all(len(set(bundle.test[k].paths)) == counts.per_kind for k in KINDS)
    assert os.path.isfile(os.path.join(settings.data.root, "data", "demo.json"))


def test_padim_finds_the_demo_lesions(demo):
    """efficientnet_lite0 at 128 px: pixel AUROC inside the head > 0.9 on the lesion slices; a
    control (normal test slices scored against the lesion boxes) stays near chance, so the score
    comes from the lesions, not from where the boxes happen to lie."""
    from sklearn.metrics import roc_auc_score

    from utils.evaluation.images import score_group
    from utils.padim.model import Padim

    settings, bundle = demo
    assert settings.backbone == "efficientnet_lite0" and settings.image_size == 128
    model = Padim(settings).fit(Loader(bundle.train, settings), progress=False)
    labels, values, boxes = [], [], []
    for kind in KINDS:
        group = score_group(model, bundle.test[kind], settings)  # each slice once, the union of its boxes
        for mask, head, heat in zip(group.masks, group.heads, group.maps):
            labels.append(mask[head])
            values.append(heat[head])
            boxes.append(mask)
    auroc = roc_auc_score(np.concatenate(labels), np.concatenate(values))
    assert auroc > 0.9, auroc

    normal = bundle.test[NORMAL]
    normal_items = [normal[i] for i in range(len(normal))]
    normal_maps = model.score(Loader(normal, settings), progress=False).maps
    control_labels, control_values = [], []
    for k, (item, heat) in enumerate(zip(normal_items, normal_maps)):
        head = item["head"].numpy()
        borrowed = boxes[k % len(boxes)] & head
        if borrowed.any():
            control_labels.append(borrowed[head])
            control_values.append(heat[head])
    control = roc_auc_score(np.concatenate(control_labels), np.concatenate(control_values))
    assert control < 0.75, control
    assert auroc - control > 0.2


# ---------------------------------------------------------------------------- the NIfTI demo
@pytest.fixture(scope="module")
def nifti_demo(tmp_path_factory):
    from utils.data.demo.nifti import generate_nifti_demo

    return generate_nifti_demo(tmp_path_factory.mktemp("nifti") / "demo", seed=0)


def test_nifti_demo_manifest_grids_orientations_and_lesions(nifti_demo):
    import nibabel as nib

    from utils.data.demo.nifti import NIFTI_KINDS
    from utils.data.volumes import read_manifest

    entries = read_manifest([os.path.join(nifti_demo, "volumes.csv")])  # checks files, shapes and affines
    splits = [e.split for e in entries]
    assert (splits.count("train"), splits.count("val")) == (8, 2) and splits.count("test") >= len(NIFTI_KINDS)
    assert {e.group for e in entries if e.split == "test"} == set(NIFTI_KINDS)
    codes = {nib.aff2axcodes(nib.load(e.image).affine) for e in entries}
    assert ("R", "A", "S") in codes and len(codes) > 1  # some volumes need reorienting
    for entry in entries:
        image = np.asarray(nib.load(entry.image).dataobj, dtype=np.float64)
        brain = np.asarray(nib.load(entry.brain_mask).dataobj) > 0
        assert 0.05 < brain.mean() < 0.6 and image[brain].mean() > 2 * image[~brain].mean()
        if entry.split == "test":
            label = np.asarray(nib.load(entry.label).dataobj) > 0
            assert label.sum() > 50 and (label <= brain).all()
        else:
            assert entry.label is None
    size = sum(os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(nifti_demo) for f in files)
    assert size < 10 * 2**20


def test_nifti_demo_is_deterministic_and_refuses_a_full_folder(nifti_demo, tmp_path):
    from utils.data.demo.nifti import generate_nifti_demo

    again = generate_nifti_demo(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(nifti_demo)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_nifti_demo(again, seed=0)


def test_nifti_command_line_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    assert demo_data.main(["--nifti", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    with pytest.raises(SystemExit) as info:
        demo_data.main([str(tmp_path / "a"), "--nifti", str(tmp_path / "b")])
    assert info.value.code == 2 and not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
