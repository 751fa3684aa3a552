"""The user documentation stays true: docs/config.md lists exactly the validated settings with their
defaults, every relative link and image in the markdown files exists, and the README's quick start
runs the commands CI runs."""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest
import yaml

from conftest import ROOT
from utils.config import DataSettings, Settings

ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|")
#: Markdown files a reader follows links in.
DOCS = ["README.md", os.path.join("data", "README.md"), os.path.join("bench", "README.md"),
        os.path.join("experiments", "README.md")] + sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


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


# ---------------------------------------------------------------------------- links and images
def _read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as handle:
        return handle.read()


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _links(relative: str) -> list[tuple[bool, str]]:
    """``(is_image, target)`` of every link in a markdown file, external ones left out."""
    found = [(bang == "!", target) for bang, target in LINK.findall(_prose(_read(relative)))]
    return [(image, t) for image, t in found if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("document", DOCS)
def test_every_relative_link_and_image_exists(document):
    folder = os.path.dirname(os.path.join(ROOT, document))
    problems = []
    for _, target in _links(document):
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(folder, path)) if path else os.path.join(ROOT, document)
        if not os.path.exists(file):
            problems.append(f"{target}: {os.path.relpath(file, ROOT)} does not exist")
        elif anchor and file.endswith(".md") and anchor not in _anchors(_read(os.path.relpath(file, ROOT))):
            problems.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(file, ROOT)}")
    assert not problems, f"{document}: " + "; ".join(problems)


def test_readme_shows_only_committed_demo_figures():
    """Images of real scans (fastMRI) may not be redistributed: the README shows demo figures only."""
    images = [target for image, target in _links("README.md") if image]
    assert images, "the README shows a demo figure at the top"
    for target in images:
        assert re.fullmatch(r"sources/demo_[\w.-]+\.png", target), target


# ---------------------------------------------------------------------------- quick start == CI
def _command(line: str) -> str:
    """A shell command without its comment, the interpreter prefix and quiet flags."""
    words = line.split("#", 1)[0].split()
    if words[:2] in (["python", "-m"], ["python3", "-m"]):
        words = words[2:]
    return " ".join(w for w in words if w != "-q")


def _quick_start_commands() -> list[str]:
    readme = _read("README.md")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "the quick start has a bash block"
    return [_command(line) for line in block.group(1).splitlines() if _command(line)]


def _ci_commands() -> list[str]:
    lines = [line.strip() for line in _read(os.path.join(".ci", "run")).splitlines()]
    shell = ("set ", "cd ", "#", "export ")
    return [_command(line) for line in lines if line and not line.startswith(shell) and not line.startswith("#!")]


def test_readme_quick_start_runs_what_ci_runs():
    quick_start, ci = _quick_start_commands(), _ci_commands()
    assert ci == ["pip install -r requirements.txt", "pytest"], ci
    installs = [c for c in quick_start if c.startswith("pip install")]
    tests = [c for c in quick_start if c.startswith("pytest")]
    assert installs + tests == ci, (quick_start, ci)
    assert "utils evaluate --config config.yaml" in quick_start
