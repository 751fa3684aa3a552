"""The user documentation stays true: docs/config.md is what utils/config.py says of every setting,
the pages cite only modules, functions and files that exist (docs/architecture.md traces a run by
function names, and draws the layers of the import contract), every relative link and image in the
markdown files exists, and the README's quick start runs the commands CI runs.

``python tests/test_docs.py --write-config-md`` rewrites docs/config.md from utils/config.py."""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from conftest import ROOT  # first: puts the repository on sys.path when this file runs as a script
import utils
from utils.config import BACKBONES, DataSettings, Settings, settings_from_dict
from utils.errors import ConfigError
from utils.padim.model_file import MODEL_DATA_KEYS, MODEL_KEYS

#: Markdown files a reader follows links in.
DOCS = ["README.md", os.path.join("data", "README.md"), os.path.join("bench", "README.md"),
        os.path.join("experiments", "README.md")] + sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CONFIG_MD = os.path.join(ROOT, "docs", "config.md")
REGENERATE = "python tests/test_docs.py --write-config-md"


def _read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as handle:
        return handle.read()


# ---------------------------------------------------------------------------- docs/config.md from utils/config.py
#: Settings whose allowed values are a table of the code rather than their type.
CHOICES = {"backbone": lambda: list(BACKBONES)}
#: How a plain type reads in the "allowed" column.
TYPE_WORDS = {bool: "`true`, `false`", int: "integer", float: "number", str: "text"}
LIST_WORDS = {int: "integers", float: "numbers", str: "names"}

CONFIG_INTRO = f"""# Configuration keys

<!-- Generated from the settings' `#:` comments in utils/config.py: edit those, then run `{REGENERATE}`. -->

Every key of `config.yaml`, validated in one place (`utils/config.py`): an unknown key, a wrong type or a
value out of range is one error naming the key and what is allowed. "model" marks the keys that define a
fitted model file (`utils.padim.model_file.MODEL_KEYS` and `MODEL_DATA_KEYS`: a file fitted with other
values is refused); the others are run-time settings. Paths (`results_dir`, `weights`, `data.root`,
`data.manifest`) expand `~` and `$NAME` as a shell does; an unknown user or an unset variable is an error.
An integer with a leading zero is decimal (`010` is ten, not YAML 1.1's octal 8), `1:30` is text (not base-60
90) and `1e-3` a number where a number is expected."""


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` -> its ``#:`` comment lines (those right above it), joined."""
    lines, _ = inspect.findsource(cls)
    tree = ast.parse("".join(lines))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    comments = {}
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            above, number = [], statement.lineno - 2
            while number >= 0 and lines[number].strip().startswith("#:"):
                above.insert(0, lines[number].strip()[2:].strip())
                number -= 1
            comments[statement.target.id] = " ".join(above)
    return comments


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _yaml(value) -> str:
    """``value`` as YAML in one line (``null``, ``true``, ``[1, 2]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _allowed(name: str, hint) -> str:
    if name in CHOICES:
        return ", ".join(f"`{choice}`" for choice in CHOICES[name]())
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_allowed(name, a) for a in inner) + (", `null`" if len(inner) < len(args) else "")
    if origin is Literal:
        return ", ".join(f"`{_yaml(a)}`" for a in args)
    if origin is list:
        return f"list of {LIST_WORDS.get(args[0], _allowed(name, args[0]))}"
    return TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def config_rows(cls: type, prefix: str = "", model_keys=()) -> list[str]:
    """One table row per non-dataclass field of ``cls``: key, default, allowed values, model, meaning."""
    hints, comments = get_type_hints(cls), field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        model = "yes" if f.name in model_keys else ""
        rows.append(f"| `{prefix}{f.name}` | `{_yaml(_default(f))}` | {_allowed(f.name, hints[f.name])} | {model} "
                    f"| {_cell(comments.get(f.name, ''))} |")
    return rows


def config_markdown() -> str:
    """docs/config.md as utils/config.py defines it."""
    header = ["| key | default | allowed | model | meaning |", "|---|---|---|:---:|---|"]
    parts = [CONFIG_INTRO, "## Top-level keys", "\n".join(header + config_rows(Settings, "", MODEL_KEYS))]
    hints = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if dataclasses.is_dataclass(hints[f.name]):
            keys = MODEL_DATA_KEYS if hints[f.name] is DataSettings else ()
            parts += [f"## {f.name.capitalize()} keys (`{f.name}:`)",
                      "\n".join(header + config_rows(hints[f.name], f"{f.name}.", keys))]
    return "\n\n".join(parts) + "\n"


def test_config_reference_is_generated_from_the_settings():
    with open(CONFIG_MD, encoding="utf-8") as handle:
        documented = handle.read()
    assert documented == config_markdown(), f"docs/config.md differs from utils/config.py: run `{REGENERATE}`"


def test_every_setting_has_a_comment():
    """The `#:` comment is a setting's documentation: docs/config.md shows it."""
    for cls in (Settings, DataSettings):
        hints, comments = get_type_hints(cls), field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name]) and not comments[f.name]]
        assert not missing, f"give these {cls.__name__} fields a `#:` comment in utils/config.py: {missing}"


ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \| ([^|]*) \| (yes|) \|")


def _documented() -> dict[str, re.Match]:
    with open(CONFIG_MD, encoding="utf-8") as handle:
        return {m.group(1): m for m in map(ROW.match, handle) if m}


def test_config_reference_lists_every_key_with_its_default_as_yaml():
    """Read back as a reader would: every key once, its default as YAML equal to the dataclass default."""
    expected = {f.name: _default(f) for f in dataclasses.fields(Settings) if f.name != "data"}
    expected |= {f"data.{f.name}": _default(f) for f in dataclasses.fields(DataSettings)}
    documented = _documented()
    assert sorted(documented) == sorted(expected)
    for key, value in expected.items():
        assert yaml.safe_load(documented[key].group(2)) == value, key


def _settings_with(key: str, value) -> Settings:
    raw = {"data": {key[len("data."):]: value}} if key.startswith("data.") else {key: value}
    if key == "data.format" and value == "nifti":
        raw["data"]["manifest"] = "volumes.csv"  # nifti needs one; it is read only when the data are loaded
    return settings_from_dict(raw)


def test_config_reference_allows_what_the_validation_allows():
    """Read back as a reader would: every value listed as allowed passes the validation, and where
    the column lists every choice, a value it does not list is refused."""
    for key, match in _documented().items():
        allowed = match.group(3)
        for choice in re.findall(r"`([^`]+)`", allowed):
            _settings_with(key, yaml.safe_load(choice))
        if re.fullmatch(r"`[^`]+`(, `[^`]+`)*", allowed):
            with pytest.raises(ConfigError):
                _settings_with(key, "not-listed")


def test_model_column_is_the_model_file_check():
    documented = _documented()
    marked = sorted(key for key, m in documented.items() if m.group(4) == "yes")
    assert marked == sorted(list(MODEL_KEYS) + [f"data.{k}" for k in MODEL_DATA_KEYS])


def test_method_lists_the_model_defining_settings_of_the_model_file():
    text = re.sub(r"\s+", " ", _read(os.path.join("docs", "method.md")))
    listed = re.search(r"The model-defining settings: (.*?)\. ", text)
    assert listed, "docs/method.md lists the model-defining settings after 'The model-defining settings: '"
    keys = re.findall(r"`([\w.]+)`", listed.group(1))
    assert len(keys) == len(set(keys)), keys
    assert sorted(keys) == sorted(list(MODEL_KEYS) + [f"data.{k}" for k in MODEL_DATA_KEYS])


def test_generator_renders_a_setting_it_has_not_seen(tmp_path, monkeypatch):
    """A setting added tomorrow needs no change here: its row comes from its type, default and comment."""
    (tmp_path / "new_settings.py").write_text(
        "from dataclasses import dataclass, field\n"
        "from typing import Literal, Optional\n\n\n"
        "@dataclass(frozen=True)\n"
        "class NewSettings:\n"
        "    #: A choice | with a pipe, ``code`` and\n"
        "    #: two lines.\n"
        "    mode: Literal[\"a\", \"b\"] = \"b\"\n"
        "    size: Optional[int] = None\n"
        "    #: Names.\n"
        "    names: list[str] = field(default_factory=lambda: [\"x\"])\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("new_settings")
    assert config_rows(module.NewSettings, "data.", ("mode",)) == [
        "| `data.mode` | `b` | `a`, `b` | yes | A choice \\| with a pipe, `code` and two lines. |",
        "| `data.size` | `null` | integer, `null` |  |  |",
        "| `data.names` | `[x]` | list of names |  | Names. |",
    ]


def write_config_md() -> None:
    with open(CONFIG_MD, "w", encoding="utf-8") as handle:
        handle.write(config_markdown())


# ---------------------------------------------------------------------------- names and files the pages cite
#: ``utils.x.y`` anywhere in a page: a module, or an attribute of one.
DOTTED = re.compile(r"(?<![\w./-])(utils(?:\.[A-Za-z_]\w*)+)")
#: A file of this repository named by its path (a path inside another repository is preceded by a
#: folder, and outputs such as bench/out/*.json have other endings), or a folder of the package.
PATH = re.compile(r"(?<![\w./-])((?:utils|tests|bench|docs|configs|experiments)/(?:[\w.-]+/)*[\w-]+\.(?:py|yaml)"
                  r"|utils/(?:\w+/)+)")
#: ``name()`` or ``Class.method()`` in backticks: a function or method of the package.
CALL = re.compile(r"`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(\)`")
ARCHITECTURE = os.path.join("docs", "architecture.md")


def _resolve(dotted: str):
    """The object ``utils.a.b.C.d`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    assert "__main__" not in parts, dotted  # importing it would run the command line
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[end:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def _package_modules() -> list[types.ModuleType]:
    """Every module of the package but ``utils.__main__`` (importing it runs the command line)."""
    names = [m.name for m in pkgutil.walk_packages(utils.__path__, "utils.") if not m.name.endswith("__main__")]
    return [importlib.import_module(name) for name in ["utils", *names]]


def _defined_in_package(chain: str, modules: list[types.ModuleType]) -> bool:
    """Whether some module of the package defines ``chain`` (``name`` or ``Class.attribute``)."""
    first, *rest = chain.split(".")
    for module in modules:
        obj = module.__dict__.get(first)
        if obj is None or not getattr(obj, "__module__", "").startswith("utils"):
            continue
        for attribute in rest:
            obj = getattr(obj, attribute, None)
        if callable(obj):
            return True
    return False


@pytest.mark.parametrize("document", DOCS)
def test_every_utils_name_a_page_cites_exists(document):
    problems = []
    for dotted in sorted(set(DOTTED.findall(_read(document)))):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{dotted} ({type(exc).__name__}: {exc})")
    assert not problems, f"{document} cites what the package does not have: " + "; ".join(problems)


@pytest.mark.parametrize("document", DOCS)
def test_every_repository_path_a_page_cites_exists(document):
    missing = sorted({path for path in PATH.findall(_read(document)) if not os.path.exists(os.path.join(ROOT, path))})
    assert not missing, f"{document} names files that do not exist: {missing}"


def test_architecture_cites_only_functions_the_package_defines():
    calls = sorted(set(CALL.findall(_read(ARCHITECTURE))))
    assert len(calls) > 40, "docs/architecture.md traces the run as `function()` names"
    modules = _package_modules()
    missing = [call for call in calls if not _defined_in_package(call, modules)]
    assert not missing, f"docs/architecture.md cites functions the package does not define: {missing}"


def test_the_name_checks_find_a_missing_one():
    """The checks above can fail: a renamed function, module or file is reported."""
    modules = _package_modules()
    assert _defined_in_package("Run.load_data", modules) and _defined_in_package("prepare", modules)
    assert not _defined_in_package("Run.load_everything", modules)
    assert not _defined_in_package("distributed_score", modules)
    assert not _defined_in_package("Dataset.__getitem__", modules)  # torch's, not the package's
    for gone in ("utils.volume_evaluation", "utils.preprocess.prepare", "utils.data.preprocess.head_masks"):
        with pytest.raises((ImportError, AttributeError)):
            _resolve(gone)
    assert _resolve("utils.data.preprocess.prepare") is _resolve("utils.data.prepare")
    cited = "see `utils/preprocess.py`, utils/padim/, projects/x/configs/a.yaml, bench/out/r.json, bench/out/"
    assert PATH.findall(cited) == ["utils/preprocess.py", "utils/padim/"]


def _layer_lines() -> list[str]:
    block = re.search(r"```\n(.*?)```", _read(ARCHITECTURE), flags=re.S)
    assert block, "docs/architecture.md draws the layers in a code block"
    return block.group(1).splitlines()


def _contract_layers() -> list[list[str]]:
    text = _read(".importlinter").split("[importlinter:contract:layers]", 1)[1]
    listed = text.split("layers =", 1)[1].split("\n[", 1)[0]
    return [[name.strip() for name in line.split("|")] for line in listed.strip().splitlines()]


def test_architecture_draws_the_layers_of_the_import_contract():
    """Top to bottom, the figure's lines name the contract's layers in the contract's order, and every
    module of the contract appears in the figure."""
    layers = _contract_layers()
    index = {module: number for number, line in enumerate(layers) for module in line}
    order = []
    for line in _layer_lines():
        first = re.search(r"utils/(\w+)", line)
        assert first, line
        order.append(index[f"utils.{first.group(1)}"])
    assert order == sorted(order), order
    figure = "\n".join(_layer_lines())
    absent = [m for line in layers for m in line if not re.search(rf"\b{m.split('.')[-1]}(\.py|/)", figure)]
    assert not absent, f"the figure in docs/architecture.md leaves out {absent}"


# ---------------------------------------------------------------------------- links and images
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


def test_readme_layout_names_folders_and_files_that_exist():
    section = _read("README.md").split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block, "the README's layout is a code block"
    named = [word for line in block.group(1).splitlines() for word in re.findall(r"^([\w./]+(?:, [\w./]+)*)\s", line)]
    paths = [path for entry in named for path in entry.split(", ")]
    assert {"utils/padim/", "utils/data/", "utils/evaluation/", "docs/", "bench/"} <= set(paths), paths
    missing = [path for path in paths if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"the README's layout names what does not exist: {missing}"
    folders = {path.split("/")[0] for path in paths if "/" in path} | {"/".join(path.split("/")[:2]) for path in paths}
    unnamed = [name for name in sorted(os.listdir(os.path.join(ROOT, "utils")))
               if os.path.isdir(os.path.join(ROOT, "utils", name)) and not name.startswith("__")
               and f"utils/{name}" not in folders]
    assert not unnamed, f"the README's layout leaves out the package folders {unnamed}"
    tracked = _tracked_top_level_folders()
    assert tracked - folders == set(), f"the README's layout leaves out the repository's folders {sorted(tracked - folders)}"


def _tracked_top_level_folders() -> set[str]:
    """Top-level folders that hold committed files (hidden ones aside)."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to know the committed folders")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    return {path.split("/")[0] for path in listed if "/" in path and not path.startswith(".")}


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


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-config-md"]:
        sys.exit(f"usage: {REGENERATE}")
    write_config_md()
    print(f"wrote {os.path.relpath(CONFIG_MD)}")
