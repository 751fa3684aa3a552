"""Spatial normalisation (``data.align``): transforms from mask moments, the warp and its inverse,
and the model hooks (``none`` untouched, ``moments`` maps back on the image's own grid)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import smooth_textures, to_batch
from utils.padim import align
from utils.padim.align import CANONICAL_AREA, from_canonical, invert, moment_transform, to_canonical
from utils.config import settings_from_dict
from utils.errors import ConfigError, ModelFileError
from utils.padim.model import Padim
from utils.padim.foreground import head_masks

SIZE = 64


def _ellipse(cy: float, cx: float, ry: float, rx: float, degrees: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Bool ellipse with semi-axes ``ry`` (vertical before turning) and ``rx``, turned by ``degrees``
    (counter-clockwise on screen is negative here: positive turns x towards +y, i.e. down)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    t = math.radians(degrees)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(t) + dy * math.sin(t)  # coordinates in the ellipse's own axes
    v = -dx * math.sin(t) + dy * math.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _normalised(pixel: float, size: int = SIZE) -> float:
    return (2 * pixel + 1) / size - 1


def _moments(mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Centroid (row, col), area fraction and the major axis' angle from the vertical, in degrees."""
    rows, cols = np.nonzero(mask)
    covariance = np.cov(np.stack([cols, rows]).astype(np.float64), bias=True)
    values, vectors = np.linalg.eigh(covariance)
    vx, vy = vectors[:, 1] * np.sign(vectors[1, 1] or 1.0)
    return np.array([rows.mean(), cols.mean()]), float(mask.mean()), math.degrees(math.atan2(vx, vy))


def _pixel_affine(transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A normalised (x, y) transform (as F.affine_grid reads it) written for
    scipy.ndimage.affine_transform: matrix and offset in pixel (row, column) coordinates."""
    swap = np.array([[0, 1], [1, 0]])
    matrix = swap @ transform[:, :2] @ swap
    k = 1 / SIZE - 1  # pixel p -> normalised (2 / S) p + k, and back p = S / 2 (u + 1) - 1 / 2
    offset = SIZE / 2 * (matrix @ np.full(2, k) + swap @ transform[:, 2] + 1) - 0.5
    return matrix, offset


def test_transform_holds_the_centroid_the_area_scale_and_the_tilt():
    mask = _ellipse(cy=36.5, cx=27.5, ry=24, rx=16, degrees=20)
    transform = moment_transform(mask).numpy()
    linear, shift = transform[:, :2], transform[:, 2]
    np.testing.assert_allclose(shift, [_normalised(27.5), _normalised(36.5)], atol=0.01)  # (x, y) order
    scale = math.sqrt(abs(np.linalg.det(linear)))
    assert scale == pytest.approx(math.sqrt(mask.mean() / CANONICAL_AREA), rel=1e-9)
    assert np.linalg.det(linear) > 0  # a rotation, never a mirror image
    assert math.degrees(math.atan2(linear[1, 0], linear[0, 0])) == pytest.approx(20, abs=1.0)


def test_translation_moves_the_centroid_to_the_centre_and_nothing_else():
    mask = _ellipse(cy=38, cx=25, ry=22, rx=15, degrees=-25)
    np.testing.assert_allclose(moment_transform(mask, similarity=False).numpy()[:, :2], np.eye(2))
    image = torch.from_numpy(mask).float()[None, None]
    warped, _ = to_canonical(image, torch.from_numpy(mask)[None], similarity=False)
    rows, cols = np.nonzero(mask)
    shift = (31.5 - rows.mean(), 31.5 - cols.mean())  # sub-pixel: compare with scipy's own shift
    expected = ndimage.shift(mask.astype(np.float64), shift, order=1, mode="constant")
    np.testing.assert_allclose(warped[0, 0].numpy(), expected, atol=1e-5)
    assert _moments(warped[0, 0].numpy() > 0.5)[1] == pytest.approx(mask.mean(), abs=0.005)  # area kept


@pytest.mark.parametrize("degrees, expected", [(0, 0), (30, 30), (-40, -40), (100, 10), (170, -10), (-95, -5), (180, 0)])
def test_rotation_is_the_smallest_one_never_a_half_turn(degrees, expected):
    """The principal axis has no sign and may be the major or the minor one: the turn is taken modulo
    90 degrees, so an upside-down or sideways head is never turned by 180 or 90 degrees."""
    linear = moment_transform(_ellipse(32, 32, 24, 14, degrees)).numpy()[:, :2]
    angle = math.degrees(math.atan2(linear[1, 0], linear[0, 0]))
    assert angle == pytest.approx(expected, abs=1.0)
    assert abs(angle) <= 45 + 1e-9 and np.linalg.det(linear) > 0


def test_round_or_missing_heads_are_not_rotated_or_moved():
    linear = moment_transform(_ellipse(32, 32, 20, 20, degrees=33)).numpy()[:, :2]
    assert linear[0, 1] == 0 and linear[1, 0] == 0
    identity = np.array([[1, 0, 0], [0, 1, 0]], dtype=float)
    np.testing.assert_array_equal(moment_transform(np.zeros((SIZE, SIZE), bool)).numpy(), identity)
    np.testing.assert_array_equal(moment_transform(np.ones((SIZE, SIZE), bool)).numpy(), identity)


def test_canonical_head_is_centred_upright_and_of_the_canonical_area():
    mask = _ellipse(cy=38, cx=26, ry=22, rx=15, degrees=-25)
    warped, _ = to_canonical(torch.from_numpy(mask).float()[None, None], torch.from_numpy(mask)[None])
    centre, area, tilt = _moments(warped[0, 0].numpy() > 0.5)
    np.testing.assert_allclose(centre, [31.5, 31.5], atol=0.5)
    assert area == pytest.approx(CANONICAL_AREA, abs=0.01)
    assert abs(tilt) < 1.5


def test_warp_matches_scipy_affine_transform():
    """The canonical image equals scipy.ndimage.affine_transform with the same transform written
    in pixel (row, column) coordinates, inside the image (bilinear, order 1)."""
    image = smooth_textures(1, SIZE, seed=3)[0]
    mask = _ellipse(cy=30, cx=35, ry=20, rx=14, degrees=15)
    warped, transforms = to_canonical(torch.from_numpy(image)[None, None], torch.from_numpy(mask)[None])
    matrix, offset = _pixel_affine(transforms[0].numpy())
    expected = ndimage.affine_transform(image.astype(np.float64), matrix, offset=offset, order=1, mode="constant", cval=-1)
    inside = expected >= 0
    assert inside.mean() > 0.8
    np.testing.assert_allclose(warped[0, 0].numpy()[inside], expected[inside], atol=1e-5)


def test_pixels_brought_in_by_the_warp_take_the_background_median():
    rng = np.random.default_rng(4)
    mask = _ellipse(cy=10, cx=10, ry=8, rx=6)  # a head in a corner: centring it brings in area from beyond the frame
    image = np.where(mask, 0.8, 0.1 + 0.02 * rng.random((SIZE, SIZE))).astype(np.float32)
    warped, transforms = to_canonical(torch.from_numpy(image)[None, None], torch.from_numpy(mask)[None])
    grid = torch.nn.functional.affine_grid(transforms.float(), [1, 1, SIZE, SIZE], align_corners=False)[0]
    outside = (grid.abs() > 1 + 2 / SIZE).any(dim=-1).numpy()  # samples more than a pixel off the image
    assert outside.any()
    np.testing.assert_allclose(warped[0, 0].numpy()[outside], np.median(image[~mask]), atol=1e-6)


def test_blob_round_trip_stays_where_it_was():
    """A map that marks a blob in the canonical frame comes back with the blob at its known centre."""
    mask = _ellipse(cy=36, cx=28, ry=22, rx=15, degrees=12)
    blob = ((np.mgrid[:SIZE, :SIZE] - np.array([40.0, 24.0])[:, None, None]) ** 2).sum(0) <= 4**2
    image = np.stack([mask, blob]).astype(np.float32)[None]  # channel 1: the blob
    warped, transforms = to_canonical(torch.from_numpy(image), torch.from_numpy(mask)[None])
    assert not np.allclose(warped[0, 1].numpy(), blob)  # the warp moved it
    back = from_canonical(warped[:, 1], transforms)[0].numpy()
    assert back.shape == (SIZE, SIZE)
    np.testing.assert_allclose(ndimage.center_of_mass(back), [40.0, 24.0], atol=0.3)
    np.testing.assert_allclose(invert(invert(transforms)), transforms, atol=1e-12)


@pytest.fixture
def align_settings(small_settings):
    return small_settings.replace(flip_test=True)


def _heads(count: int, seed: int) -> np.ndarray:
    """Gray slices: a textured bright ellipse (a "head") at varying places and tilts on a dark background."""
    rng = np.random.default_rng(seed)
    textures = smooth_textures(count, SIZE, seed)
    heads = [_ellipse(32 + rng.uniform(-4, 4), 32 + rng.uniform(-4, 4), 22, 16, rng.uniform(-15, 15)) for _ in range(count)]
    return np.stack([np.where(h, 0.3 + 0.7 * t, 0.05) for h, t in zip(heads, textures)]).astype(np.float32)


def _centred_heads(count: int, seed: int) -> np.ndarray:
    """Textured discs centred on the image (mirror-symmetric masks, clear of the background): the
    head a translation would move is already where the translation puts it."""
    centre = (SIZE - 1) / 2
    disc, core = _ellipse(centre, centre, 20, 20), _ellipse(centre, centre, 14, 14)  # a flat rim: the Otsu edge is the disc's
    return np.stack([np.where(disc, 0.7 + 0.3 * core * (t - 0.5), 0.05) for t in smooth_textures(count, SIZE, seed)]).astype(np.float32)


def test_align_none_never_warps_and_equals_translation_on_centred_heads(align_settings, monkeypatch):
    """On heads already centred, translation is the identity: its model equals the unaligned one.
    ``none`` never calls the warp at all."""
    train, test = to_batch(_centred_heads(8, seed=5)), to_batch(_centred_heads(2, seed=6))
    translated = Padim(align_settings.replace(data={"align": "translation"})).fit(train, progress=False)
    expected = translated.score(test, progress=False).maps
    monkeypatch.setattr("utils.padim.align.to_canonical", lambda *a, **k: pytest.fail("none must not align"))
    maps = Padim(align_settings).fit(train, progress=False).score(test, progress=False).maps
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4)
    assert align_settings.data.align == "none"


@pytest.mark.parametrize("mode", ["translation", "moments"])
def test_aligned_model_is_the_plain_model_on_warped_images_with_maps_warped_back(align_settings, mode):
    """Fit and score happen in the canonical frame, and the map returns to the image's own grid:
    the same as fitting an unaligned model on the warped training images, scoring the warped test
    images and warping the maps back with scipy.ndimage.affine_transform."""
    train, test = to_batch(_heads(12, seed=7)), to_batch(_heads(2, seed=8))
    maps = Padim(align_settings.replace(data={"align": mode})).fit(train, progress=False).score(test, progress=False).maps
    similarity = mode == "moments"
    plain = Padim(align_settings).fit(to_canonical(train, head_masks(train), similarity)[0], progress=False)
    canonical, transforms = to_canonical(test, head_masks(test), similarity)
    canonical_maps = plain.score(canonical, progress=False).maps
    for image_map, canonical_map, transform in zip(maps, canonical_maps, invert(transforms).numpy()):
        matrix, offset = _pixel_affine(transform)
        expected = ndimage.affine_transform(canonical_map.astype(np.float64), matrix, offset=offset, order=1, mode="constant", cval=-1)
        inside = expected >= 0  # image pixels whose source lies on the canonical grid (moments zooms in on small heads)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(image_map[inside], expected[inside], rtol=1e-4, atol=1e-3)


def test_align_key_is_validated_and_defines_the_model(small_settings, tmp_path):
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"data": {"align": "affine"}})
    assert "\n" not in str(info.value) and "data.align" in str(info.value) and "moments" in str(info.value)
    path = Padim(small_settings).fit(to_batch(_heads(4, seed=9)), progress=False).save(tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="data.align"):
        Padim.load(path, small_settings.replace(data={"align": "moments"}))
    assert align.MIN_ELONGATION > 1
