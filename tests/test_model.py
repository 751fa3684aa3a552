"""The fitted estimator end to end on synthetic images: detection, determinism, persistence."""


import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import smooth_textures, to_batch
from utils.config import BACKBONES
from utils.padim.backbones import build_backbone
from utils.errors import BackboneError, DataError, ModelFileError
from utils.padim.features import PatchEmbedder, channel_selection, random_channel_indices
from utils.padim.model import Padim
from utils.padim.model_file import check_input_kind


def _blob_set(size=64, count=6, seed=100):
    """Test textures with a bright disk at a random place; returns gray images and masks."""
    rng = np.random.default_rng(seed)
    images = smooth_textures(count, size, seed)
    masks = np.zeros_like(images, dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for image, mask in zip(images, masks):
        cy, cx = rng.integers(12, size - 12, size=2)
        mask[:] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 6**2
        image[mask] = 1.0
    return images, masks


def test_bright_blob_scores_higher_than_texture(small_settings):
    model = Padim(small_settings).fit(to_batch(smooth_textures(40, 64, seed=0)), progress=False)
    images, masks = _blob_set()
    result = model.score(to_batch(images), progress=False)
    assert result.maps.shape == (6, 64, 64) and result.scores.shape == (6,)
    assert np.isfinite(result.maps).all()
    assert roc_auc_score(masks.ravel(), result.maps.ravel()) > 0.9
    assert all(m[k].mean() > m[~k].mean() for m, k in zip(result.maps, masks))


def test_same_seed_identical_maps_other_seed_other_channels(small_settings):
    train = to_batch(smooth_textures(12, 64, seed=1))
    test = to_batch(smooth_textures(2, 64, seed=2))
    first = Padim(small_settings).fit(train, progress=False).score(test, progress=False)
    second = Padim(small_settings).fit(train, progress=False).score(test, progress=False)
    assert np.array_equal(first.maps, second.maps)
    other = channel_selection(small_settings.replace(seed=1))[0]
    assert not torch.equal(other, channel_selection(small_settings)[0])
    assert len(other.unique()) == small_settings.output_dimension


def test_channel_selection_is_seeded_sorted_and_in_range():
    a = random_channel_indices(448, 100, seed=5)
    assert torch.equal(a, random_channel_indices(448, 100, seed=5))
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 100
    assert 0 <= int(a.min()) and int(a.max()) < 448


def test_embedding_matches_manual_selection_of_stage_maps(small_settings):
    """The embedding is the selected channels of the stage maps, nearest-upsampled to stride 4."""
    model = Padim(small_settings)
    images = to_batch(smooth_textures(2, 64, seed=4))
    embedding = model.embed(images)
    maps = build_backbone("efficientnet_lite0", "imagenet", [1, 2, 3])(images)
    full = torch.cat([torch.nn.functional.interpolate(m, size=(16, 16), mode="nearest") for m in maps], dim=1)
    assert embedding.shape == (2, 24, 16, 16)
    # float32 sums in another order (repeat_interleave vs interpolate, selection before upsampling) move values by ~1e-5
    torch.testing.assert_close(embedding, full[:, channel_selection(small_settings)[0]], rtol=1e-4, atol=1e-4)


def whole_batch_reference(settings, images):
    """The backbone alone over the whole batch in NCHW, every stage nearest-upsampled to stride 4
    by F.interpolate, then the selected channels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        extractor = build_backbone(settings.backbone, settings.weights, settings.layers)
    with torch.inference_mode():
        maps = extractor(images)
    grid = images.shape[-1] // 4
    full = torch.cat([torch.nn.functional.interpolate(m, size=(grid, grid), mode="nearest") for m in maps], dim=1)
    return full[:, channel_selection(settings)[0]]


@pytest.mark.parametrize("backbone, weights", [("efficientnet_lite0", "imagenet"), ("resnet18", "random")])
@pytest.mark.parametrize("micro_batch, channels_last", [(1, False), (2, True), (3, False), (4, True), (None, None)])
def test_micro_batched_embeddings_equal_the_whole_batch_ones(small_settings, backbone, weights, micro_batch, channels_last):
    settings = small_settings.replace(backbone=backbone, weights=weights, cpu_micro_batch=micro_batch, cpu_channels_last=channels_last)
    images = to_batch(smooth_textures(5, 64, seed=4))
    embedder = PatchEmbedder(settings)
    # float32 sums in another order (micro-batch, memory format, repeat_interleave vs interpolate) move values by ~1e-5
    torch.testing.assert_close(embedder(images), whole_batch_reference(settings, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("micro_batch, channels_last, passes, memory_format", [
    (2, True, [2, 2, 1], torch.channels_last),
    (3, False, [3, 2], torch.contiguous_format),
    (9, True, [5], torch.channels_last),
    (None, False, [5], torch.contiguous_format),  # 64 px: the 8 x 128 x 128 pixel budget holds 32 images
])
def test_the_cpu_forward_settings_are_honoured(small_settings, micro_batch, channels_last, passes, memory_format):
    settings = small_settings.replace(cpu_micro_batch=micro_batch, cpu_channels_last=channels_last)
    embedder = Padim(settings).embedder  # the model's own embedder: the settings reach it
    seen = []
    embedder.extractor.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    embedder(to_batch(smooth_textures(5, 64, seed=4)))
    assert [len(images) for images in seen] == passes
    assert all(images.is_contiguous(memory_format=memory_format) for images in seen)


def test_off_the_cpu_the_network_runs_the_whole_batch_in_nchw(small_settings):
    embedder = PatchEmbedder(small_settings.replace(cpu_micro_batch=2, cpu_channels_last=True))
    chunks = list(embedder.chunks(torch.empty(40, 3, 64, 64, device="meta")))
    assert [len(chunk) for chunk in chunks] == [40] and chunks[0].is_contiguous()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_its_stage_channels_at_strides_4_8_16(name):
    extractor = build_backbone(name, "random", [1, 2, 3])
    with torch.inference_mode():
        maps = extractor(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == list(BACKBONES[name].stage_channels)
    assert [m.shape[-1] for m in maps] == [16, 8, 4]


def test_resnet_imagenet_without_internet_gives_one_line_error(monkeypatch):
    import torch.hub
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError) as info:
        build_backbone("resnet18", "imagenet", [1, 2, 3])
    message = str(info.value)
    assert "\n" not in message and "weights: /path/to/file.pth" in message and "efficientnet_lite" in message


def _unmodified_network(name):
    """The network as its package builds it, and its stride-4/8/16 stage modules (torchvision's layer1-3;
    EfficientNet-Lite0's blocks 2, 4 and 10, where its resolution halves next)."""
    if name == "resnet18":
        import torchvision

        network = torchvision.models.resnet18(weights=None)
        return network, [network.layer1, network.layer2, network.layer3]
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    return network, [network._blocks[2], network._blocks[4], network._blocks[10]]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_stage_maps_of_a_weights_file_equal_the_unmodified_network(name, tmp_path):
    """A weights file with non-trivial batch-norm statistics: the extractor (batch norms folded into the
    convolutions, paddings inside them) gives the stage maps that forward hooks record on the package's
    own network, run as it is in eval mode."""
    network, stages = _unmodified_network(name)
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor, low in ((module.weight, 0.5), (module.bias, -0.5), (module.running_mean, -0.5), (module.running_var, 0.5)):
                tensor.data = low + torch.rand(tensor.shape, generator=generator)
    path = tmp_path / f"{name}.pth"
    torch.save(network.state_dict(), path)
    recorded = []
    for stage in stages:
        stage.register_forward_hook(lambda module, args, output: recorded.append(output))
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        network.eval()(images)
        maps = build_backbone(name, str(path), [1, 2, 3])(images)
    for got, expected in zip(maps, recorded[:3], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(BackboneError, match="does not fit wide_resnet50_2" if name == "resnet18" else "does not fit"):
        build_backbone("wide_resnet50_2", str(path), [1])


def test_save_load_round_trip_gives_identical_scores(small_settings, tmp_path):
    model = Padim(small_settings).fit(to_batch(smooth_textures(10, 64, seed=3)), progress=False)
    test = to_batch(smooth_textures(3, 64, seed=4))
    path = model.save(tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind
    loaded = Padim.load(path, small_settings)
    before, after = model.score(test, progress=False), loaded.score(test, progress=False)
    assert np.array_equal(before.maps, after.maps) and np.array_equal(before.scores, after.scores)
    assert loaded.train_count == 10


def test_a_model_whose_weights_file_changed_since_the_fit_is_refused(small_settings, tmp_path):
    import torchvision

    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    settings = small_settings.replace(backbone="resnet18", weights=str(weights))
    path = Padim(settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False).save(tmp_path / "m.pt")
    original, state = weights.read_bytes(), torch.load(weights, weights_only=True)
    state["conv1.weight"] += 0.1  # other features: the model's statistics no longer describe them
    torch.save(state, weights)
    with pytest.raises(ModelFileError, match="other weights than the file .*w.pth holds now"):
        Padim.load(path, settings)
    weights.write_bytes(original)
    assert Padim.load(path, settings).train_count == 4


def test_weights_that_give_non_finite_features_are_named_on_fit_and_score(small_settings, tmp_path):
    import torchvision

    network = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "w.pth"
    torch.save(network.state_dict(), weights)
    settings = small_settings.replace(backbone="resnet18", weights=str(weights))
    model = Padim(settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False)
    network.bn1.running_var.fill_(-1.0)  # a damaged file: the batch norm's square root of a negative variance
    torch.save(network.state_dict(), weights)
    model.__dict__.pop("embedder")  # built again from the file, as a new process would
    for call in (lambda: Padim(settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False),
                 lambda: model.score(to_batch(smooth_textures(2, 64, seed=4)), progress=False)):
        with pytest.raises(DataError, match=r"backbone gives NaN or Inf features for finite images: check its weights"):
            call()


def test_files_of_another_version_are_refused_with_what_to_do(small_settings, tmp_path):
    model = Padim(small_settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False)
    payload = torch.load(model.save(tmp_path / "v2.pt"), weights_only=True)
    payload["version"] = 1
    torch.save(payload, tmp_path / "v1.pt")
    with pytest.raises(ModelFileError, match="version 1.*refit"):
        Padim.load(tmp_path / "v1.pt", small_settings)


@pytest.mark.parametrize(
    "change, key",
    [({"backbone": "efficientnet_lite1"}, "backbone"), ({"image_size": 96}, "image_size"),
     ({"output_dimension": 20}, "output_dimension"), ({"seed": 9}, "seed"),
     ({"data": {"volume_intensity": "zscore"}}, "data.volume_intensity"),  # NIfTI: what the slices hold
     ({"data": {"min_brain_fraction": 0.3}}, "data.min_brain_fraction")],  # NIfTI: which slices it was fitted on
)
def test_loading_with_other_model_settings_is_refused(small_settings, tmp_path, change, key):
    """A model fitted on volume slices: every key counts; for images the NIfTI keys change nothing and are not compared."""
    fitted = small_settings.replace(data={"format": "nifti", "manifest": "volumes.csv"})
    path = Padim(fitted).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False).save(tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=key):
        Padim.load(path, fitted.replace(**change))
    images = Padim(small_settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False).save(tmp_path / "i.pt")
    if key.startswith("data."):
        assert Padim.load(images, small_settings.replace(**change)).train_count == 4


FORMATS = {"demo": {}, "mvtec": {"root": "data/mvtec/bottle"}, "study": {}, "nifti": {"manifest": "volumes.csv"}}
IMAGES, VOLUMES = "fitted on images (PNG, MVTec, demo) and cannot score NIfTI volume slices", \
    "fitted on NIfTI volume slices and cannot score images (PNG, MVTec, demo)"


@pytest.mark.parametrize("fitted, used, refused", [
    ("demo", "demo", None), ("demo", "mvtec", None), ("study", "demo", None), ("nifti", "nifti", None),
    ("demo", "nifti", IMAGES), ("mvtec", "nifti", IMAGES), ("nifti", "demo", VOLUMES), ("nifti", "study", VOLUMES),
])
def test_a_model_scores_only_the_kind_of_input_it_was_fitted_on(small_settings, tmp_path, fitted, used, refused):
    """evaluate --model and predict load with the config's settings; predict also names the kind of its input files."""
    model = Padim(small_settings.replace(data={"format": fitted, **FORMATS[fitted]}))
    positions, dim = small_settings.feature_size**2, small_settings.kept_channels
    model.mean, model.cholesky = torch.zeros(positions, dim), torch.eye(dim).repeat(positions, 1, 1)
    model.train_count = 1
    path = model.save(tmp_path / "m.pt")
    settings, volumes = small_settings.replace(data={"format": used, **FORMATS[used]}), used == "nifti"
    for use in (lambda: Padim.load(path, settings),
                lambda: check_input_kind(Padim.load(path).settings, volumes, "this model"),
                lambda: check_input_kind(model.settings, volumes, "this model")):
        if refused is None:
            use()
        else:
            with pytest.raises(ModelFileError) as info:
                use()
            assert refused in str(info.value) and "\n" not in str(info.value)


def test_run_time_settings_may_differ_when_loading(small_settings, tmp_path):
    path = Padim(small_settings).fit(to_batch(smooth_textures(4, 64, seed=3)), progress=False).save(tmp_path / "m.pt")
    loaded = Padim.load(path, small_settings.replace(blur_sigma=0.0, batch_size=2))
    assert loaded.settings.blur_sigma == 0.0 and loaded.settings.batch_size == 2


def test_bad_inputs_are_refused_clearly(small_settings):
    model = Padim(small_settings)
    with pytest.raises(DataError, match=r"shape \(N, 3, 64, 64\)"):
        model.fit(torch.zeros(2, 3, 32, 32), progress=False)
    bad = torch.zeros(2, 3, 64, 64)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        model.fit(bad, progress=False)
    with pytest.raises(DataError, match="empty"):
        model.fit([], progress=False)
    with pytest.raises(ModelFileError, match="not fitted"):
        model.score(torch.zeros(1, 3, 64, 64), progress=False)


def test_fit_gives_numpys_mean_and_regularised_inverse_covariance(small_settings):
    """Streaming statistics over uneven batches against numpy on all embeddings at once."""
    settings = small_settings.replace(covariance_dtype="float64", batch_size=7)
    train = to_batch(smooth_textures(30, 64, seed=5))
    model = Padim(settings).fit(train, progress=False)
    samples = _embeddings(model, train).numpy()  # (P, N, d)
    np.testing.assert_allclose(model.mean.numpy(), samples.mean(axis=1), rtol=1e-9, atol=1e-9)
    for position in (0, 100, samples.shape[0] - 1):
        expected = np.linalg.inv(np.cov(samples[position], rowvar=False) + settings.epsilon * np.eye(samples.shape[2]))
        np.testing.assert_allclose(precision(model)[position].numpy(), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    assert model.train_count == 30


# ---------------------------------------------------------------- quality options (docs/quality.md)
def precision(model):
    """The fitted precisions, ``(L L^T)^-1`` of the stored Cholesky factors by numpy, to compare with numpy's inverses."""
    factors = model.cholesky.double().numpy()
    return torch.from_numpy(np.linalg.inv(factors @ factors.transpose(0, 2, 1)))


def _embeddings(model, images):
    """Position-major embeddings ``(P, N, d)`` in float64, computed directly by the backbone."""
    with torch.inference_mode():
        return model.embed(images).double().flatten(2).permute(2, 0, 1).contiguous()


def test_ledoit_wolf_fit_matches_sklearn_per_position(small_settings):
    from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage

    from utils.padim.shrinkage import shrink_ledoit_wolf

    settings = small_settings.replace(covariance_shrinkage="ledoit_wolf", covariance_dtype="float64", batch_size=7)
    train = to_batch(smooth_textures(30, 64, seed=11))  # 30 images < 24 channels + margin: shrinkage matters
    model = Padim(settings)
    stats = model.accumulate(train, progress=False)
    with torch.inference_mode():  # accumulate() returns inference tensors, shrunk in place
        coefficients = shrink_ledoit_wolf(stats)
    samples = _embeddings(model, train).numpy()  # (P, N, d)
    expected = np.array([ledoit_wolf_shrinkage(x) for x in samples])
    assert 0.0 < expected.min() and expected.max() < 1.0  # a case where shrinkage is neither off nor total
    np.testing.assert_allclose(coefficients.numpy(), expected, rtol=1e-6, atol=1e-9)

    fitted = Padim(settings).fit(train, progress=False)
    n = samples.shape[1]
    for position in (0, 77, samples.shape[0] - 1):
        shrunk = ledoit_wolf(samples[position])[0] * n / (n - 1)  # sklearn: biased covariance; PaDiM: n - 1
        reference = np.linalg.inv(shrunk + settings.epsilon * np.eye(shrunk.shape[0]))
        np.testing.assert_allclose(precision(fitted)[position].numpy(), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())  # float32 features of other batch sizes
    plain = Padim(small_settings.replace(covariance_dtype="float64")).fit(train, progress=False)
    assert not torch.allclose(precision(plain), precision(fitted))


def test_ledoit_wolf_refuses_statistics_without_all_moments(small_settings):
    settings = small_settings.replace(covariance_shrinkage="ledoit_wolf")
    train = to_batch(smooth_textures(8, 64, seed=12))
    model = Padim(settings)
    stats = model.accumulate(train[:4], progress=False)
    stats.count += 4  # as all_reduce_statistics merges another rank's shard: the moments cover only this one
    with pytest.raises(DataError, match="single-process"):
        model.fit_statistics(stats)


def test_flip_test_maps_are_mirror_equivariant(small_settings):
    """Averaging an image's map with the mirrored map of its mirror image makes scoring commute with
    the mirror: the map of the mirrored image is the mirrored map, and a mirror-symmetric image gets
    a mirror-symmetric map. A model without flip_test, fitted on asymmetric images, has neither."""
    train = to_batch(smooth_textures(12, 64, seed=13))
    images, _ = _blob_set(count=3)
    batch = to_batch(images)
    symmetric = to_batch(0.5 * (images + images[:, :, ::-1]))
    for flip_test, holds in ((True, True), (False, False)):
        model = Padim(small_settings.replace(flip_test=flip_test)).fit(train, progress=False)
        maps = model.score(batch, progress=False).maps
        mirrored = model.score(batch.flip(-1), progress=False).maps
        own = model.score(symmetric, progress=False).maps
        assert np.allclose(mirrored, maps[:, :, ::-1], rtol=1e-4, atol=1e-4) == holds
        assert np.allclose(own, own[:, :, ::-1], rtol=1e-4, atol=1e-4) == holds


def test_mask_background_zeroes_the_map_outside_the_estimated_head(small_settings):
    size = 64
    yy, xx = np.mgrid[:size, :size]
    head = (yy - 32) ** 2 / 26**2 + (xx - 32) ** 2 / 20**2 <= 1
    gray = (0.4 + 0.6 * smooth_textures(10, size, seed=14)) * head  # a bright "head" on a black background
    train = to_batch(gray[:8])
    test = to_batch(gray[8:])
    plain = Padim(small_settings).fit(train, progress=False).score(test, progress=False).maps
    masked = Padim(small_settings.replace(mask_background=True)).fit(train, progress=False).score(test, progress=False).maps
    from scipy import ndimage

    far = ndimage.binary_erosion(~head, iterations=8)  # well outside the ellipse and its 4 px margin
    core = ndimage.binary_erosion(head, iterations=3)
    assert (masked[:, far] == 0).all() and (plain[:, far] > 0).all()
    np.testing.assert_array_equal(masked[:, core], plain[:, core])


def test_flip_train_equals_fitting_on_the_images_and_their_mirror_images(small_settings):
    settings = small_settings.replace(covariance_dtype="float64")
    train = to_batch(smooth_textures(10, 64, seed=15))
    augmented = Padim(settings.replace(flip_train=True)).fit(train, progress=False)
    reference = Padim(settings).fit(torch.cat([train, train.flip(-1)]), progress=False)
    assert augmented.train_count == reference.train_count == 20
    torch.testing.assert_close(augmented.mean, reference.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(precision(augmented), precision(reference), rtol=1e-8, atol=1e-8)


def test_spatial_pooling_fits_each_position_on_its_neighbours_samples(small_settings):
    settings = small_settings.replace(covariance_dtype="float64", spatial_pooling=1, output_dimension=6)
    images = to_batch(smooth_textures(10, 64, seed=8))
    model = Padim(settings).fit(images, progress=False)
    embeddings = model.embed(images).double().numpy()  # (N, d, 16, 16)
    for y, x in [(0, 0), (5, 7), (15, 9)]:  # a corner, the inside, an edge
        samples = np.concatenate([embeddings[:, :, v, u] for v in range(max(0, y - 1), min(16, y + 2))
                                  for u in range(max(0, x - 1), min(16, x + 2))])
        expected = np.linalg.inv(np.cov(samples, rowvar=False) + settings.epsilon * np.eye(6))
        np.testing.assert_allclose(precision(model)[y * 16 + x].numpy(), expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())
    assert model.train_count == 10


def test_semi_orthogonal_reduction_projects_all_channels_on_orthonormal_seeded_columns(small_settings):
    """Against NumPy: the Q factor (signs fixed so that R's diagonal is positive) of the seeded
    Gaussian ``(176, 24)`` matrix, applied to all 176 channels of the same backbone."""
    gaussian = torch.randn(176, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    q, r = np.linalg.qr(gaussian)
    columns = q * np.sign(np.diag(r))
    np.testing.assert_allclose(columns.T @ columns, np.eye(24), atol=1e-12)
    images = to_batch(smooth_textures(3, 64, seed=9))
    projected = Padim(small_settings.replace(channel_reduction="semi_orthogonal")).embed(images)
    other_seed = Padim(small_settings.replace(channel_reduction="semi_orthogonal", seed=1)).embed(images)
    full = Padim(small_settings.replace(output_dimension=None)).embed(images)  # all 176 channels, same backbone
    expected = np.einsum("ndhw,dk->nkhw", full.double().numpy(), columns)
    assert projected.shape == (3, 24, 16, 16)
    np.testing.assert_allclose(projected.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(other_seed.double().numpy(), expected, rtol=1e-2, atol=1e-2)


def test_semi_orthogonal_model_fits_scores_and_round_trips(small_settings, tmp_path):
    settings = small_settings.replace(channel_reduction="semi_orthogonal")
    train, test = to_batch(smooth_textures(12, 64, seed=10)), to_batch(smooth_textures(2, 64, seed=11))
    model = Padim(settings).fit(train, progress=False)
    maps = model.score(test, progress=False).maps
    loaded = Padim.load(model.save(tmp_path / "so.pt"), settings)
    np.testing.assert_array_equal(loaded.score(test, progress=False).maps, maps)
    with pytest.raises(ModelFileError, match="channel_reduction"):
        Padim.load(tmp_path / "so.pt", small_settings)
