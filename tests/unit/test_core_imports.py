"""The core is what production installs: without the [demo] extra it imports neither pamqp nor the testbed
(the demo, the throw-away Rucio server, the embedded broker). Issue 14."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTBED = "injector.testbed"
DEMO_ONLY = ("pamqp",)  # the [demo] extra's distributions, which are also their import names

# A fresh interpreter imports every core module, then asks the CLI for the --help of every verb (and sub-verb).
PROBE = """
import argparse, contextlib, importlib, io, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from injector import cli

def verbs(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from verbs(sub, (*path, name))

helped = []
for verb in [(), *verbs(cli.build_parser())]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main([*verb, "--help"])
    helped.append(" ".join(verb))
print(json.dumps({"modules": sorted(sys.modules), "helped": helped}))
"""


def shipped_packages() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["tool"]["setuptools"]["packages"])


def is_testbed(name: str) -> bool:
    return name == TESTBED or name.startswith(TESTBED + ".")


def core_files() -> dict[str, Path]:
    """Every module of the shipped packages but the testbed, by dotted name."""
    files = {}
    for package in shipped_packages():
        if is_testbed(package):
            continue
        for path in sorted((ROOT / package.replace(".", "/")).glob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def test_the_core_imports_neither_pamqp_nor_the_testbed_even_for_every_verbs_help():
    modules = sorted(core_files())
    assert "injector.cli" in modules and "injector.config" in modules, modules
    proc = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert {"", "ingest", "cleanup", "demo", "dlq"} <= set(seen["helped"]), seen["helped"]
    leaked = [m for m in seen["modules"] if is_testbed(m) or m.partition(".")[0] in DEMO_ONLY]
    assert leaked == [], f"a core install would need the [demo] extra for: {leaked}"


def test_pamqp_is_required_only_by_the_demo_extra_and_the_test_extra_brings_the_demo():
    requires = importlib.metadata.requires("rucio-injector") or []
    for name in DEMO_ONLY:
        lines = [r for r in requires if r.partition(";")[0].strip().lower().startswith(name)]
        assert lines, f"{name} is not required at all: {requires}"
        assert all(r.partition(";")[2].strip() == 'extra == "demo"' for r in lines), lines
    assert 'rucio-injector[demo]; extra == "test"' in requires, requires


def imports_of_the_testbed(path: Path) -> list[tuple[int, bool]]:
    """(line, inside a function) of every import of the testbed in this file."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(node) for func in ast.walk(tree) if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
                   for node in ast.walk(func) if node is not func}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        if any(is_testbed(n) for n in names):
            found.append((node.lineno, id(node) in in_function))
    return found


def test_no_core_module_imports_the_testbed_but_the_cli_lazily_for_its_demo_verb():
    wrong = []
    for name, path in core_files().items():
        for line, lazily in imports_of_the_testbed(path):
            if not (name == "injector.cli" and lazily):
                wrong.append(f"{path.relative_to(ROOT)}:{line}")
    assert wrong == [], f"the core imports the testbed (only tests/ and benchmarks/ may): {wrong}"
    assert imports_of_the_testbed(ROOT / "injector" / "cli.py"), "the probe above would miss the demo verb's import"


def test_every_package_directory_is_shipped_and_the_tests_are_not():
    shipped = set(shipped_packages())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("*/**/__init__.py")
             if not p.relative_to(ROOT).parts[0].startswith(".")
             and p.relative_to(ROOT).parts[0] not in ("tests", "build", "mutants")}
    assert found == shipped, f"[tool.setuptools] packages differs from the code: {sorted(found ^ shipped)}"


def test_without_the_demo_extra_the_demo_verb_says_what_to_install_in_one_line():
    no_pamqp = "import sys; sys.modules['pamqp'] = None; from injector.cli import main; sys.exit(main(['demo']))"
    proc = subprocess.run([sys.executable, "-c", no_pamqp], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr  # as every configuration or usage error (injector/exits.py)
    assert proc.stderr == ("rucio-injector demo: the demo needs pamqp, which is not installed: "
                           "pip install 'rucio-injector[demo]'\n"), proc.stderr
