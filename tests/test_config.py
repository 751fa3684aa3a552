"""Config validation: each bad setting gives one clear error naming key, value and what is allowed."""

import os

import pytest

from utils.config import Settings, load_config, settings_from_dict
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_config_loads_with_channel_check():
    settings = load_config(os.path.join(ROOT, "config.yaml"))
    assert settings.backbone == "efficientnet_lite0" and settings.total_channels == 176
    assert settings.target_dimension == 176 and settings.kept_channels == 100


@pytest.mark.parametrize(
    "backbone, total", [("resnet18", 448), ("wide_resnet50_2", 1792), ("efficientnet_lite0", 176), ("efficientnet_lite2", 192)]
)
def test_channel_sums(backbone, total):
    assert settings_from_dict({"backbone": backbone, "target_dimension": total}).total_channels == total


@pytest.mark.parametrize(
    "raw, fragments",
    [
        ({"backbon": "resnet18"}, ["unknown config key `backbon`", "did you mean `backbone`"]),
        ({"backbone": "resnet19"}, ["`backbone` is 'resnet19'", "resnet18", "allowed"]),
        ({"output_dimension": 500, "backbone": "resnet18"}, ["`output_dimension` is 500", "1 to 448"]),
        ({"target_dimension": 400, "backbone": "resnet18"}, ["`target_dimension` is 400", "448"]),
        ({"seed": "zero"}, ["`seed` must be an integer", "'zero'"]),
        ({"epsilon": "small"}, ["`epsilon` must be a number"]),
        ({"epsilon": -1.0}, ["`epsilon` is -1.0", "> 0"]),
        ({"blur_sigma": -2}, ["`blur_sigma` is -2.0"]),
        ({"image_size": 100}, ["`image_size` is 100", "multiple of 16"]),
        ({"image_size": 16}, ["`image_size` is 16"]),
        ({"device": "tpu"}, ["`device` is 'tpu'", "auto, cpu, cuda"]),
        ({"batch_size": 0}, ["`batch_size` is 0"]),
        ({"cpu_micro_batch": 0}, ["`cpu_micro_batch` is 0"]),
        ({"batch_size": 2**63}, ["`batch_size` is 9223372036854775808", "at most 16777216"]),
        ({"cpu_micro_batch": 2**25}, ["`cpu_micro_batch` is 33554432", "at most 16777216"]),
        ({"data": {"num_workers": 100000}}, ["`data.num_workers` is 100000", "per CPU"]),
        ({"epsilon": 1e300}, ["`epsilon` is 1e+300", "at most 1e+06"]),  # the statistics would overflow
        ({"cpu_channels_last": "yes"}, ["`cpu_channels_last` must be true or false"]),
        ({"batch_size": True}, ["`batch_size` must be an integer"]),
        ({"layers": [3, 1]}, ["`layers` is [3, 1]"]),
        ({"layers": []}, ["`layers` must be a non-empty list, got []"]),
        ({"data": {"formt": "study"}}, ["unknown config key `data.formt`", "did you mean `data.format`"]),
        ({"data": {"resize": "crop"}}, ["`data.resize` is 'crop'", "pad, stretch"]),
        ({"data": "here"}, ["`data` must be a mapping"]),
        ({"weights": "imagenet21k"}, ["`weights` is 'imagenet21k'"]),
        ({"covariance_shrinkage": "oas"}, ["`covariance_shrinkage` is 'oas'", "none, ledoit_wolf"]),
        ({"flip_train": "no"}, ["`flip_train` must be true or false", "'no'"]),
        ({"flip_test": "yes"}, ["`flip_test` must be true or false", "'yes'"]),
        ({"mask_background": 1}, ["`mask_background` must be true or false"]),
        ({"spatial_pooling": 4}, ["`spatial_pooling` is 4", "0 (off) to 3"]),
        ({"spatial_pooling": 1, "covariance_shrinkage": "ledoit_wolf"}, ["cannot be combined"]),
        ({"results_dir": "$PADIM_UNSET_ZZ/x"}, ["`results_dir` is '$PADIM_UNSET_ZZ/x'",
                                                "cannot expand $PADIM_UNSET_ZZ:"]),
        ({"data": {"root": "${PADIM_UNSET_ZZ}"}}, ["`data.root`", "cannot expand ${PADIM_UNSET_ZZ}"]),
    ],
)
def test_each_bad_setting_gives_one_clear_error(raw, fragments):
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("backbone: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: resnet18\noutput_dimension: 100\n")
    settings = load_config(path, seed=3)
    assert settings.seed == 3 and settings.epsilon == Settings().epsilon == 0.01
    assert settings.blur_sigma == 4.0 and settings.replace(seed=4).seed == 4
    with pytest.raises(ConfigError):
        settings.replace(output_dimension=449)


@pytest.mark.parametrize("text, key, expected", [
    ("epsilon: 1e-3\n", "epsilon", 0.001),  # YAML 1.1 reads it as a string: a number float() parses is a number
    ("blur_sigma: '2.5'\n", "blur_sigma", 2.5),
    ("seed: 010\n", "seed", 10),  # YAML 1.2's decimal, not YAML 1.1's octal 8
    ("seed: 0_12\n", "seed", 12),
    ("seed: 0x1F\n", "seed", 31),
    ("data:\n  root: 1:30\n", "data.root", "1:30"),  # not YAML 1.1's base-60 number 90
    ("results_dir: ~/padim-results\n", "results_dir", os.path.expanduser("~/padim-results")),
    ("data:\n  root: ~/demo\n", "data.root", os.path.expanduser("~/demo")),
    ("results_dir: $HOME/padim-results\n", "results_dir", os.path.join(os.environ["HOME"], "padim-results")),
    ("data:\n  root: ${HOME}/demo\n", "data.root", os.path.join(os.environ["HOME"], "demo")),
])
def test_settings_that_yaml_users_write_are_read_as_meant(tmp_path, text, key, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    settings = load_config(path)
    value = settings.data.root if key == "data.root" else getattr(settings, key)
    assert value == expected


def test_merge_keys_take_the_anchor_and_the_explicit_keys_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  <<: {root: x, resize: stretch}\n  resize: pad\n")
    settings = load_config(path)
    assert (settings.data.root, settings.data.resize) == ("x", "pad")
