"""NIfTI volumes: the manifest and its errors, maps written back onto the scan's own grid (checked
through world coordinates), per-volume metrics against scikit-learn, and PaDiM on the NIfTI demo."""

from __future__ import annotations

import csv
import os
import stat
import time
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage
from scipy.spatial.transform import Rotation
from sklearn.metrics import average_precision_score, roc_auc_score

import yaml

from utils.cli import main
from utils.config import settings_from_dict
from utils.data.demo.nifti import generate_nifti_demo
from utils.errors import DataError
from utils.padim.model import ScoreResult
from utils.evaluation import Run
from utils.data.volumes import ObliqueVolumeWarning, SliceSet, load_volume_data, read_manifest, read_volume
from utils.evaluation.volumes import VolumeUnits, volume_metrics
from utils.predict import predict_volumes

SHAPE = (24, 30, 20)


def _settings(manifest, **data):
    return settings_from_dict({"backbone": "efficientnet_lite0", "image_size": 64, "output_dimension": 24, "device": "cpu",
                               "batch_size": 8, "blur_sigma": 1.0,
                               "data": {"format": "nifti", "manifest": str(manifest), "min_brain_fraction": 0.0} | data})


def _head(shape=SHAPE, value=0.3, noise=0.05):
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    inside = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, shape)) <= 1
    rng = np.random.default_rng(0)
    return np.where(inside, value + noise * rng.random(shape), 0.0).astype(np.float32), inside


def _save(folder, name, array, affine=np.eye(4)):
    path = os.path.join(folder, name)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return name


def _manifest(folder, rows, columns=("split", "image", "label", "brain_mask", "group", "case")):
    path = os.path.join(folder, "volumes.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{c: row.get(c, "") for c in columns} for row in rows])
    return path


@pytest.fixture
def small_set(tmp_path):
    """Two train volumes, one with a label; one test volume with a label and a brain mask."""
    image, inside = _head()
    label = np.zeros(SHAPE, np.uint8)
    label[10:13, 12:15, 8:10] = 1
    folder = str(tmp_path)
    rows = [
        {"split": "train", "image": _save(folder, "a.nii.gz", image)},
        {"split": "train", "image": _save(folder, "b.nii", image * 2), "label": _save(folder, "b_label.nii.gz", label)},
        {"split": "test", "image": _save(folder, "c.nii.gz", image), "label": _save(folder, "c_label.nii.gz", label),
         "brain_mask": _save(folder, "c_brain.nii.gz", inside.astype(np.uint8)), "group": "lesion"},
    ]
    return folder, rows, label


def test_manifest_defaults_and_paths(small_set):
    folder, rows, _ = small_set
    entries = read_manifest([_manifest(folder, rows)])
    assert [e.case for e in entries] == ["a", "b", "c"]
    assert [e.group for e in entries] == ["test", "test", "lesion"]
    assert entries[1].label == os.path.join(folder, "b_label.nii.gz") and entries[0].label is None
    assert entries[2].source == "volumes.csv line 4"


def test_training_slices_skip_the_labelled_ones_and_val_is_held_out_by_volume(small_set):
    folder, rows, label = small_set
    bundle = load_volume_data(_settings(_manifest(folder, rows), val_fraction=0.5))
    assert len(bundle.val.entries) == 1 and len(bundle.train.entries) == 1
    assert {e.case for e in bundle.val.entries}.isdisjoint(e.case for e in bundle.train.entries)
    assert "held out" in bundle.val_description
    both = SliceSet("train", bundle.val.entries + bundle.train.entries, bundle.train.settings)
    lesion_slices = set(np.flatnonzero(label.any(axis=(0, 1))))  # identity affine: already RAS+
    by_case = {}
    for number, z in both.index:
        by_case.setdefault(both.entries[number].case, set()).add(z)
    assert by_case["b"].isdisjoint(lesion_slices) and lesion_slices <= by_case["a"]


def _error(folder, rows, columns=None, **data):
    manifest = _manifest(folder, rows, columns) if columns else _manifest(folder, rows)
    with pytest.raises(DataError) as info:
        load_volume_data(_settings(manifest, **data))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_manifest_errors_name_the_file_and_row(small_set):
    folder, rows, label = small_set
    image, _ = _head()
    test_row = rows[2]
    assert "line 2" in _error(folder, [{"split": "train", "image": "missing.nii.gz"}, test_row])
    with open(os.path.join(folder, "x.png"), "wb") as handle:
        handle.write(b"\x89PNG")
    assert "not a NIfTI" in _error(folder, [{"split": "train", "image": "x.png"}, test_row])
    small = _save(folder, "small.nii.gz", label[:-1])
    assert "shape" in _error(folder, [{"split": "train", "image": "a.nii.gz", "label": small}, test_row])
    moved = _save(folder, "moved.nii.gz", label, np.diag([2.0, 1, 1, 1]))
    assert "affine" in _error(folder, [{"split": "train", "image": "a.nii.gz", "brain_mask": moved}, test_row])
    four = _save(folder, "four.nii.gz", np.stack([image, image], axis=-1))
    assert "volume_index" in _error(folder, [{"split": "train", "image": four}, test_row])
    assert "out of range" in _error(folder, [{"split": "train", "image": four}, test_row], volume_index=2)
    nan = _save(folder, "nan.nii.gz", np.full(SHAPE, np.nan, np.float32))
    assert "no finite voxel (all NaN or Inf)" in _error(folder, [{"split": "train", "image": nan}, test_row])
    flat = _save(folder, "flat.nii.gz", np.ones(SHAPE, np.float32))
    assert "constant" in _error(folder, [{"split": "train", "image": flat}, test_row])
    rgb = _save(folder, "rgb.nii.gz", np.zeros(SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")]))
    assert "holds RGB voxels" in _error(folder, [{"split": "train", "image": rgb}, test_row])
    assert "no test volumes" in _error(folder, rows[:2])
    assert "unknown column 'weight'" in _error(folder, rows, columns=("split", "image", "weight"))
    for case in ("c", "C"):  # "C" and "c" name one output file where case is ignored (macOS, Windows)
        assert "case name 'c' of" in _error(folder, [dict(rows[0], case=case)] + rows[1:])  # named at the later row
    message = _error(folder, [{"split": "train", "image": "missing.nii.gz"}, test_row])
    assert "volumes.csv" in message and "missing.nii.gz" in message
    # damaged or hostile files and rows
    whole = open(os.path.join(folder, rows[0]["image"]), "rb").read()
    with open(os.path.join(folder, "cut.nii.gz"), "wb") as handle:
        handle.write(whole[: len(whole) // 3])  # the header reads, the voxels do not
    assert "cannot read the voxels of" in _error(folder, [{"split": "train", "image": "cut.nii.gz"}, test_row])
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"], header["srow_z"] = 1, 0, [0, 0, 0, 0]  # the z axis collapsed
    nib.save(nib.Nifti1Image(image.astype(np.float32), None, header), os.path.join(folder, "singular.nii.gz"))
    flat_affine = "singular.nii.gz"
    assert "no usable affine" in _error(folder, [{"split": "train", "image": flat_affine}, test_row])
    for case in ("../../evil", "a/b", ".."):  # the case names output files: never a path
        assert "not a plain file name" in _error(folder, [dict(rows[0], case=case)] + rows[1:])
    binary = os.path.join(folder, "binary.csv")
    with open(binary, "wb") as handle:
        handle.write(b"split,image\n\xff\xfe train")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_manifest([binary])


def test_a_4d_image_with_volume_index_uses_that_volume(small_set):
    folder, rows, _ = small_set
    image, _ = _head()
    four = _save(folder, "four.nii.gz", np.stack([np.zeros(SHAPE, np.float32), image], axis=-1))
    entries = read_manifest([_manifest(folder, [{"split": "train", "image": four}])], volume_index=1)
    volume = read_volume(entries[0], _settings("unused.csv", volume_index=1))
    assert volume.image.max() == 1.0 and volume.scan.shape == SHAPE


class IntensityModel:
    """A stand-in for Padim: the map is the network input's first channel (monotone in intensity),
    smoothed so that the plateau of the intensity clipping peaks at its centre."""

    def __init__(self, settings):
        self.settings = settings
        self.device = torch.device("cpu")

    def score(self, batches, progress=True, region=None):
        images = torch.cat([batch["image"] for batch in batches])
        maps = ndimage.gaussian_filter(images[:, 0].numpy().astype(np.float32), sigma=(0, 4, 4))
        return ScoreResult(maps, maps.reshape(len(maps), -1).max(axis=1))


def _oblique_affine(axcodes):
    """``axcodes`` voxel order with a 12 degree rotation, 2 x 1.5 x 3 mm voxels, an offset."""
    base = nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([2.0, 1.5, 3.0, 1.0]))
    reoriented = base.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes)))
    angle = np.deg2rad(12)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rotation[:3, 3] = [10.0, -20.0, 5.0]
    return rotation @ reoriented.affine


# PIR, ASL: cyclic axis orders (sagittal storage); a NIfTI-2 scan's map is NIfTI-2, written without nibabel's complaints
@pytest.mark.parametrize("axcodes, kind", [("LIP", nib.Nifti1Image), ("PIR", nib.Nifti1Image),
                                           ("ASL", nib.Nifti2Image)])
def test_maps_return_to_the_scan_grid_of_an_oblique_non_canonical_image(tmp_path, capfd, axcodes, kind):
    head, _ = _head(noise=0.0)
    affine = _oblique_affine(axcodes)
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    blob_voxel = (7, 19, 12)  # in the stored (non-canonical) voxel order
    grid = np.indices(SHAPE)
    blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grid, blob_voxel)) / (2 * 1.5**2))
    stored = (head + 0.7 * blob).astype(np.float32)
    path = os.path.join(tmp_path, "scan.nii.gz")
    nib.save(kind(stored, affine), path)
    model = IntensityModel(_settings("unused.csv"))
    rows = predict_volumes(model, read_manifest([path]), str(tmp_path / "out"), progress=False)
    saved = nib.load(str(tmp_path / "out" / "scan_anomaly.nii.gz"))
    assert type(saved) is kind and capfd.readouterr().err == ""
    assert saved.shape == SHAPE and saved.get_data_dtype() == np.float32
    assert np.allclose(saved.affine, affine)
    peak = np.unravel_index(np.argmax(np.asarray(saved.dataobj)), SHAPE)
    assert np.allclose(apply_affine(saved.affine, peak), apply_affine(affine, blob_voxel))
    assert os.path.isfile(tmp_path / "out" / "scan_anomaly.png")
    # the reported slice is the RAS+ axial index of the peak, through the canonical image's affine
    canonical = nib.as_closest_canonical(nib.load(path))
    ras_peak = np.rint(apply_affine(np.linalg.inv(canonical.affine), apply_affine(affine, blob_voxel))).astype(int)
    assert rows[0]["slice"] == ras_peak[2]


def test_volume_metrics_against_scikit_learn():
    rng = np.random.default_rng(3)
    shape = (6, 5, 4)
    label = np.zeros(shape, bool)
    label[2:4, 1:3, 1:3] = True
    label[1, 1, 3] = True  # in the slice that is not scored: it has no map, so no metric counts it
    anomaly = rng.random(shape) + 0.8 * label
    brain = np.ones(shape, bool)
    brain[0] = False
    kept = np.array([True, True, True, False])
    got = volume_metrics(anomaly.astype(np.float32), label, brain, kept, threshold=0.9)
    label, anomaly, brain = label[..., :3], anomaly[..., :3], brain[..., :3]  # the scored slices
    assert got["A_auroc"] == pytest.approx(roc_auc_score(label.ravel(), anomaly.ravel()))
    assert got["A_ap"] == pytest.approx(average_precision_score(label.ravel(), anomaly.ravel()))
    assert got["B_auroc"] == pytest.approx(roc_auc_score(label[brain], anomaly[brain]))
    assert got["B_ap"] == pytest.approx(average_precision_score(label[brain], anomaly[brain]))
    slice_scores = [anomaly[:, :, z][brain[:, :, z]].max() for z in range(3)]
    assert got["C_auroc"] == pytest.approx(roc_auc_score([label[:, :, z].any() for z in range(3)], slice_scores))
    predicted = (anomaly >= 0.9) & brain
    dice = 2 * (predicted & label).sum() / (predicted.sum() + (label & brain).sum())
    assert got["dice_val_threshold"] == pytest.approx(dice)
    best = max(2 * ((anomaly >= t) & brain & label).sum() / (((anomaly >= t) & brain).sum() + (label & brain).sum())
               for t in anomaly[brain])
    assert got["dice_best"] == pytest.approx(best)
    assert got["lesion_voxels"] == 2 * 2 * 2 + 1 and got["note"] == ""


@pytest.fixture(scope="module")
def nifti_demo(tmp_path_factory):
    return generate_nifti_demo(tmp_path_factory.mktemp("demo") / "nifti", seed=0)


def test_padim_finds_the_demo_lesions_and_writes_maps_on_each_scan_grid(nifti_demo, tmp_path):
    settings = settings_from_dict({
        "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 64, "output_dimension": 100,
        "blur_sigma": 2.0, "device": "cpu", "results_dir": str(tmp_path),
        "data": {"format": "nifti", "manifest": os.path.join(nifti_demo, "volumes.csv"), "intensity": "none"}})
    evaluation = Run(settings)
    evaluation.load_data()
    evaluation.fit(progress=False)
    started = time.perf_counter()
    evaluation.score(progress=False)
    per_volume = (time.perf_counter() - started) / len(evaluation.units.rows)
    table = evaluation.compute_metrics()
    folder = evaluation.save(save_model=False)
    print("\n" + evaluation.unit_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"seconds per test volume: {per_volume:.2f}")
    assert table.set_index("group").loc["mean", "B_auroc"] > 0.9
    assert evaluation.unit_table["B_auroc"].min() > 0.85, "every demo volume's lesion is found"
    for entry in (e for group in evaluation.bundle.test.values() for e in group.entries):
        image = nib.load(entry.image)
        saved = nib.load(os.path.join(folder, "maps", f"{entry.case}_anomaly.nii.gz"))
        assert saved.shape == image.shape and np.allclose(saved.affine, image.affine)
    assert set(evaluation.unit_table["case"]) == {e.case for g in evaluation.bundle.test.values() for e in g.entries}
    assert all(os.path.isfile(os.path.join(folder, f)) for f in ("volumes.csv", "metrics.csv", "metrics.md"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "no staging folder left in results_dir"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(os.path.join(folder, "maps")).st_mode) == 0o777 & ~umask, "a folder like any other"
    assert evaluation.figures and torch.get_num_threads() >= 1
    # predict on the manifest (its brain masks) gives the evaluation's map of a test volume
    model_path = evaluation.model.save(os.path.join(tmp_path, "model.pt"))
    config = os.path.join(tmp_path, "config.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(settings.to_dict(), handle)
    case = evaluation.unit_table["case"].iloc[0]
    entry = next(e for e in read_manifest([settings.data.manifest]) if e.case == case)
    manifest = _manifest(tmp_path, [{"split": "test", "image": entry.image, "brain_mask": entry.brain_mask}])  # absolute paths
    out = os.path.join(tmp_path, "predicted")
    assert main(["predict", "--config", config, "--model", model_path, "--input", manifest, "--output", out, "--quiet"]) == 0
    np.testing.assert_allclose(nib.load(os.path.join(out, f"{case}_anomaly.nii.gz")).get_fdata(),
                               nib.load(os.path.join(folder, "maps", f"{case}_anomaly.nii.gz")).get_fdata(), rtol=1e-5, atol=1e-5)
    with open(os.path.join(out, "volume_scores.csv")) as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == [entry.image]


def test_a_bad_test_volume_after_the_fit_leaves_no_maps_and_no_run_folder(small_set, tmp_path):
    folder, rows, _ = small_set
    flat = _save(folder, "flat.nii.gz", np.ones(SHAPE, np.float32))
    manifest = _manifest(folder, rows + [{"split": "test", "image": flat, "group": "lesion"}])
    settings = _settings(manifest, val_fraction=0.5).replace(results_dir=str(tmp_path / "results"))
    evaluation = Run(settings)
    evaluation.load_data()
    evaluation.model = IntensityModel(settings)
    with pytest.raises(DataError, match="flat.nii.gz.*constant"):
        evaluation.score(progress=False)  # c.nii.gz is scored and its map staged first
    assert not os.path.exists(evaluation.directory)


def test_a_4d_image_holding_one_volume_needs_no_volume_index(small_set):
    folder, rows, _ = small_set
    image, _ = _head()
    single = _save(folder, "single.nii.gz", image[..., None])
    entries = read_manifest([_manifest(folder, [{"split": "train", "image": single}, rows[2]])])
    whole = read_manifest([_manifest(folder, rows)])[0]
    np.testing.assert_array_equal(read_volume(entries[0], _settings("unused.csv")).image,
                                  read_volume(whole, _settings("unused.csv")).image)


def test_no_maps_writes_the_tables_and_no_map_volumes(small_set, tmp_path):
    folder, rows, _ = small_set
    settings = _settings(_manifest(folder, rows), val_fraction=0.5).replace(results_dir=str(tmp_path / "results"))
    evaluation = Run(settings)
    evaluation.load_data()
    evaluation.model = IntensityModel(settings)
    evaluation.score(progress=False)
    evaluation.compute_metrics()
    run = evaluation.save(save_model=False, figures=False, maps=False)
    assert sorted(os.listdir(run)) == [".padim-files.json", "config.yaml", "metrics.csv", "metrics.md", "timings.json",
                                       "volumes.csv"]
    with open(os.path.join(run, "metrics.md")) as handle:
        assert "- mean: unweighted mean over 1 group" in handle.read()


@pytest.mark.parametrize("kept, lesion_slice, reason", [
    ([False, False, False], 1, "no slice scored"),
    ([True, False, True], 1, "its lesion lies in slices under data.min_brain_fraction"),
    ([True, True, True], None, "its label is empty"),
])
def test_a_volume_without_a_lesion_in_its_scored_slices_has_no_metrics_and_says_why(kept, lesion_slice, reason):
    label = np.zeros((4, 4, 3), bool)
    if lesion_slice is not None:
        label[1, 1, lesion_slice] = True
    anomaly = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    row = volume_metrics(anomaly, label, np.ones((4, 4, 3), bool), np.array(kept), threshold=1.0)
    assert row["slices_scored"] == sum(kept) and reason in row["note"]
    assert all(np.isnan(row[c]) for c in ("A_auroc", "B_auroc", "C_auroc", "dice_val_threshold", "dice_best"))
    units = VolumeUnits(settings_from_dict({}), "run")  # its group: left out of the means, saying why
    units.rows = [{"case": "c", "group": "g"} | row]
    group = units.table(None)[0].set_index("group").loc["g"]
    assert np.isnan(group["A_auroc"]) and group["note"] == f"1 of 1 volumes without some metrics (NaN: left out of " \
                                                           f"their means): {row['note']}"


BRAIN = np.pad(np.ones((2, 2, 3), bool), ((1, 1), (1, 1), (0, 0)))  # (4, 4, 3): the middle 2x2 of each slice


@pytest.mark.parametrize("label, nan, reasons", [
    (np.ones((4, 4, 3), bool), ["A_auroc", "B_auroc", "C_auroc"],
     ["every scored voxel is lesion", "every brain voxel is lesion", "every scored slice is lesion"]),
    (~BRAIN, ["B_auroc", "C_auroc", "dice_best"], ["no lesion voxel inside the brain", "every scored slice is lesion"]),
    (BRAIN & (np.arange(3) == 1), [], []),  # one lesion slice of three, inside the brain: every metric defined
])
def test_a_metric_whose_ranking_holds_one_class_is_nan_and_the_note_says_why(label, nan, reasons):
    anomaly = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    row = volume_metrics(anomaly, label, BRAIN, np.ones(3, bool), threshold=0.5)
    assert [c for c in ("A_auroc", "B_auroc", "C_auroc", "dice_best") if np.isnan(row[c])] == nan
    assert all(reason in row["note"] for reason in reasons) and bool(row["note"]) == bool(reasons)


@pytest.mark.parametrize("degrees, warned", [((0, 0), False), ((12, 0), False), ((30, 0), False), ((0, 40), True),
                                             ((45, 45), True)])
def test_strongly_oblique_volumes_are_named_in_one_warning(tmp_path, degrees, warned):
    """The angle a rotation about the x and then the y axis gives the grid, against scipy's rotation."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xy", degrees, degrees=True).as_matrix() * 1.5  # 1.5 mm voxels
    paths = [str(tmp_path / f"{k}.nii.gz") for k in range(2)]
    for path in paths:
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_manifest(paths)
    named = [w for w in caught if issubclass(w.category, ObliqueVolumeWarning)]
    assert len(named) == (1 if warned else 0)
    if warned:
        assert str(named[0].message).startswith("2 volumes strongly oblique") and paths[0] in str(named[0].message)
