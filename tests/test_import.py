"""Importing the package must not change the process (no plotting import, thread count or allocator)."""
import json
import subprocess
import sys

PROBE = """
import json, sys, torch
threads = torch.get_num_threads()
import utils
print(json.dumps({"threads_before": threads, "threads_after": torch.get_num_threads(),
                  "matplotlib": "matplotlib" in sys.modules, "runtime": "utils.runtime" in sys.modules,
                  "ours_with_ctypes": sorted(name for name, module in sys.modules.items()
                                             if name.startswith("utils") and hasattr(module, "ctypes"))}))
"""


def test_import_changes_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["threads_after"] == state["threads_before"]
    assert not state["matplotlib"]
    assert not state["runtime"]
    assert state["ours_with_ctypes"] == []
