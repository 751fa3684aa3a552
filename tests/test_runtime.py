"""The allocator setting made on import (utils/runtime.py): applied on Linux/glibc, and skippable."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _tuned_in_fresh_process(**env: str) -> str:
    code = "import utils, utils.runtime as r; print(r.ALLOCATOR_TUNED)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_import_sets_the_malloc_thresholds_and_the_variable_turns_it_off():
    assert _tuned_in_fresh_process(PADIM_MALLOC_TUNING="1") == "True"
    assert _tuned_in_fresh_process(PADIM_MALLOC_TUNING="0") == "False"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_fewer_page_faults_for_a_backbone_pass_with_the_setting():
    """The reason for the setting, measured: minor page faults of 20 lite0 passes on batches of 8."""
    code = (
        "import resource, torch, utils; from utils.backbones import build_backbone; torch.set_num_threads(1);"
        "net = build_backbone('efficientnet_lite0', 'imagenet', [1, 2, 3]); x = torch.rand(8, 3, 128, 128);"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt;"
        "[net(x) for _ in range(20)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    faults = {}
    for flag in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PADIM_MALLOC_TUNING": flag}, timeout=300)
        assert result.returncode == 0, result.stderr
        faults[flag] = int(result.stdout.split()[-1])
    assert faults["1"] * 3 < faults["0"], faults
