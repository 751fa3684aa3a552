"""The user documentation stays true: docs/config.md lists exactly the validated settings with their defaults."""

from __future__ import annotations

import dataclasses
import os
import re

import yaml

from conftest import ROOT
from utils.config import DataSettings, Settings

ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|")


def _documented() -> dict[str, str]:
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as handle:
        return {m.group(1): m.group(2) for m in map(ROW.match, handle) if m}


def _expected() -> dict[str, object]:
    def default(f):
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    keys = {f.name: default(f) for f in dataclasses.fields(Settings) if f.name != "data"}
    keys |= {f"data.{f.name}": default(f) for f in dataclasses.fields(DataSettings)}
    return keys


def test_config_reference_lists_every_key_and_no_other():
    assert sorted(_documented()) == sorted(_expected())


def test_config_reference_shows_each_default_as_yaml():
    documented = _documented()
    for key, value in _expected().items():
        assert yaml.safe_load(documented[key]) == value, key
