"""The README's layout section and docs/architecture.md stay true: every path they name exists, every package is
placed, and every module the architecture page names by file is where it says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("injector", "consumers", "producers", "operations")


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout\n"):text.index("\n## ", text.index("## Layout\n") + 1)]


def named_paths(text: str) -> set[str]:
    """Backticked repository paths: `consumers/cleanup.py`, `injector/transport/`, `tests/unit/test_x.py`."""
    return {m for m in re.findall(r"`([\w./-]+/[\w./-]*)`", text) if not m.startswith(("http", "/"))}


def test_every_path_the_layout_and_the_architecture_page_name_exists():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for text in (layout_section(), doc):
        missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists())
        assert not missing, missing


def test_every_package_has_its_row_in_the_layout():
    packages = sorted(str(init.parent.relative_to(ROOT)) + "/" for name in PACKAGES
                      for init in (ROOT / name).rglob("__init__.py"))
    unplaced = [p for p in packages if f"`{p}`" not in layout_section()]
    assert not unplaced, unplaced


def test_modules_the_architecture_page_names_by_stem_exist():
    """`consumers/cleanup.py` `verify()`: the function named beside a module exists in it."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for path, name in re.findall(r"`([\w/]+\.py)` `(\w+)`", doc):
        assert re.search(rf"^(def|class) {name}\b", (ROOT / path).read_text(), re.M), (path, name)
