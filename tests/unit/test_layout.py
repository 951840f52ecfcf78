"""The arrows point one way: operations → consumers → injector. The core never imports the parts built on it;
only the command line (injector/cli.py) and the demo (injector/testbed/) compose them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSERS = {"injector/cli.py"}  # it starts every part (and the testbed runs the whole pipeline)


def imported(package: str) -> dict[str, set[str]]:
    """Every module of the package (by path) and the top-level packages it imports, lazily or not."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
        out[str(path.relative_to(ROOT))] = names
    return out


def test_the_core_imports_neither_consumers_nor_operations_nor_producers():
    wrong = {path: names & {"consumers", "operations", "producers"} for path, names in imported("injector").items()
             if path not in COMPOSERS and not path.startswith("injector/testbed/")}
    assert not {p: n for p, n in wrong.items() if n}


def test_the_consumers_never_import_the_operator_tools():
    assert not {path for path, names in imported("consumers").items() if "operations" in names}
