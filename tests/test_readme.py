"""README.md stays true: every marked block is run and must print what the README shows.

The blocks and their markers are described in docs/refresh_readme.py; ``python
docs/refresh_readme.py`` rewrites them from real runs after a change.
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("refresh_readme", ROOT / "docs" / "refresh_readme.py")
readme = importlib.util.module_from_spec(_spec)
sys.modules["refresh_readme"] = readme  # dataclasses look their module up there
_spec.loader.exec_module(readme)

BLOCKS = readme.parse((ROOT / "README.md").read_text())


def test_select_keeps_ranges_and_marks_the_gaps():
    lines = [str(i) for i in range(1, 11)]
    assert readme.select(lines, "") == lines
    assert readme.select(lines, "1-3,-2") == ["1", "2", "3", "...", "9", "10"]
    assert readme.select(lines, "2,5-6") == ["...", "2", "...", "5", "6", "..."]
    assert readme.select(lines, "1-4,5-10") == lines


def test_matches_needs_the_same_lines_in_order():
    assert readme.matches(["a", "b"], ["a", "b"]) == (True, "")
    ok, why = readme.matches(["a", "b"], ["a", "c"])
    assert not ok and "'b'" in why
    assert not readme.matches(["a"], ["a", "extra"])[0]
    assert readme.matches(["a", "...", "z"], ["a", "b", "c", "z"])[0]
    assert readme.matches(["...", "z"], ["z"])[0]
    assert not readme.matches(["a", "...", "z"], ["a", "b"])[0]
    # a backtracking case: the first "x" after the gap is not the right anchor
    assert readme.matches(["...", "x", "y"], ["x", "q", "x", "y"])[0]


def test_masks_only_the_volatile_figures():
    mask = r"[\d,]+ tok/s"
    assert readme.matches(["loss 5.85  7,989 tok/s"], ["loss 5.85  9,001 tok/s"], mask)[0]
    assert not readme.matches(["loss 5.85  7,989 tok/s"], ["loss 5.86  7,989 tok/s"], mask)[0]


def test_markers_are_well_formed():
    ids = {b.attrs.get("id") for b in BLOCKS if b.kind == "python"}
    for b in BLOCKS:
        if b.kind == "output":
            assert b.attrs.get("id") in ids, f"output block {b.attrs} has no python block"
        if b.kind == "run":
            assert b.lines and b.lines[0].startswith("$ "), f"README.md:{b.start}: a run block starts with '$ '"
        if b.kind == "recorded":
            assert b.attrs.get("on"), f"README.md:{b.start}: say where recorded output came from (on=...)"
    assert readme.checked(BLOCKS), "README.md has no checked blocks"


@pytest.mark.slow
@pytest.mark.parametrize("block", readme.checked(BLOCKS), ids=lambda b: b.name[:50])
def test_readme_block_prints_what_the_readme_shows(block):
    actual = readme.produce(BLOCKS, block)
    ok, why = readme.matches(block.lines, actual, block.attrs.get("mask", ""))
    assert ok, f"README.md:{block.start}: {why}\n--- real output ---\n" + "\n".join(actual)
