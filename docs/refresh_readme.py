"""Keep README.md's printed output true: run every marked block and rewrite (or check) its output.

    python docs/refresh_readme.py            # run every block here, write the real output into README.md
    python docs/refresh_readme.py --check    # run them and report blocks whose output differs (exit 1)
    python docs/refresh_readme.py --list     # the blocks and how each is checked

A block is marked by an HTML comment (invisible on GitHub) on the line before its fence:

* ``<!-- readme: run [show=RANGES] [mask=REGEX] [env=K=V,...] [stderr=1] -->`` before a fenced
  block of ``$ command`` lines, each followed by its output (standard output; with ``stderr=1``
  standard error too, where progress lines go). The commands of a block run one after another in
  one scratch folder holding a link to ``examples/``, so later commands see earlier files; each
  one's output replaces the lines under it.
* ``<!-- readme: python id=NAME -->`` before a ``python`` block, and ``<!-- readme: output id=NAME
  [show=...] [mask=...] -->`` before the block that shows what it prints.
* ``<!-- readme: recorded on="WHERE" -->`` marks output that cannot be produced here (a GPU run):
  it is listed, never checked, and says where it came from.

``show`` keeps part of a long output: comma-separated 1-based line ranges (``1-5``, ``-3`` = the
last three lines, ``7``), with ``...`` written between kept parts that are not adjacent. ``mask`` is
a regular expression for figures that differ between runs (throughput, wall times, versions): each
match is replaced by ``<~>`` on both sides before comparing (and runs of spaces are collapsed, since
a figure of another width shifts the columns after it), so everything else in the line, the losses
say, must still match exactly.

The test ``tests/test_readme.py`` runs the same blocks and fails when the README no longer matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme: (run|python|output|recorded)(.*?)-->\s*$")
ELLIPSIS = "..."
MASKED = "<~>"


@dataclasses.dataclass
class Block:
    kind: str  # run | python | output | recorded
    attrs: dict
    start: int  # index of the first line inside the fence
    end: int  # index of the closing fence
    lines: list[str]

    @property
    def name(self) -> str:
        return self.attrs.get("id") or (self.lines[0][2:] if self.lines and self.lines[0].startswith("$ ") else "?")


def _attrs(text: str) -> dict:
    out = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        out[key] = value
    return out


def parse(text: str) -> list[Block]:
    """Every marked block of the README, in order."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if not m:
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise ValueError(f"README.md line {i + 1}: a readme marker must stand right before a fenced block")
        close = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if close is None:
            raise ValueError(f"README.md line {i + 2}: unclosed fenced block")
        blocks.append(Block(m.group(1), _attrs(m.group(2)), i + 2, close, lines[i + 2:close]))
        i = close + 1
    return blocks


def select(lines: list[str], show: str) -> list[str]:
    """The lines ``show`` keeps, with ``...`` where lines are left out."""
    if not show:
        return lines
    n, keep = len(lines), set()
    for part in show.split(","):
        if part.startswith("-"):  # "-3": the last three lines
            a, b = n - int(part[1:]), n
        else:
            lo, _, hi = part.partition("-")
            a, b = int(lo) - 1, int(hi or lo)
        keep.update(range(max(a, 0), min(b, n)))
    out = []
    for i, line in enumerate(lines):
        if i in keep:
            out.append(line)
        elif not out or out[-1] != ELLIPSIS:
            out.append(ELLIPSIS)
    return out


def _mask(line: str, mask: str) -> str:
    # A masked figure may change width and shift the columns after it: compare those lines with
    # runs of spaces collapsed.
    return re.sub(r" +", " ", re.sub(mask, MASKED, line)) if mask else line


def matches(expected: list[str], actual: list[str], mask: str = "") -> tuple[bool, str]:
    """Whether ``actual`` shows ``expected``: the same lines in order (masked), where a ``...`` line
    of ``expected`` stands for any number of lines. Returns (ok, the first difference)."""
    exp = [_mask(e.rstrip(), mask) for e in expected]
    act = [_mask(a.rstrip(), mask) for a in actual]

    def walk(i: int, j: int) -> int:  # index into exp reached when consuming act[j:]; greedy with backtracking
        while i < len(exp):
            if exp[i] == ELLIPSIS:
                if i + 1 == len(exp):
                    return len(exp)
                for k in range(j, len(act)):
                    if act[k] == exp[i + 1]:
                        r = walk(i + 1, k)
                        if r == len(exp):
                            return r
                return i + 1
            if j >= len(act) or act[j] != exp[i]:
                return i
            i, j = i + 1, j + 1
        return i if j == len(act) else -1

    reached = walk(0, 0)
    if reached == len(exp):
        return True, ""
    if reached == -1:
        return False, f"the output goes on after the README's last line: {act[len(exp):][:1]}"
    return False, f"README line {reached + 1} of the block not found where expected: {exp[reached]!r}"


def _env(attrs: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1")
    env.pop("TRITON_INTERPRET", None)  # what a user gets: no interpreter unless a block asks for it
    for pair in filter(None, attrs.get("env", "").split(",")):
        k, _, v = pair.partition("=")
        env[k] = v
    return env


def _scratch() -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory(prefix="apt_hal_readme_")
    os.symlink(ROOT / "examples", pathlib.Path(tmp.name) / "examples")
    return tmp


def run_commands(block: Block, timeout: float = 900) -> list[str]:
    """Run a ``run`` block's commands in one scratch folder; return the block's new lines."""
    out: list[str] = []
    commands = [line[2:] for line in block.lines if line.startswith("$ ")]
    with _scratch() as cwd:
        for cmd in commands:
            p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(block.attrs), capture_output=True, text=True,
                               timeout=timeout)
            text = (p.stdout + (p.stderr if block.attrs.get("stderr") else "")).rstrip("\n")
            out.append("$ " + cmd)
            out += select(text.split("\n") if text else [], block.attrs.get("show", ""))
    return out


def run_python(code: list[str], attrs: dict, timeout: float = 900) -> list[str]:
    with _scratch() as cwd:
        p = subprocess.run([sys.executable, "-c", "\n".join(code)], cwd=cwd, env=_env(attrs), capture_output=True,
                           text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"README python block failed (exit {p.returncode}):\n{p.stderr}")
    return select(p.stdout.rstrip("\n").split("\n"), attrs.get("show", ""))


def produce(blocks: list[Block], block: Block) -> list[str]:
    """The lines ``block`` should hold, from a real run now."""
    if block.kind == "run":
        return run_commands(block)
    if block.kind == "output":
        code = next((b for b in blocks if b.kind == "python" and b.attrs.get("id") == block.attrs.get("id")), None)
        if code is None:
            raise ValueError(f"README output block id={block.attrs.get('id')!r} has no python block of that id")
        return run_python(code.lines, block.attrs)
    raise ValueError(f"a {block.kind} block produces nothing")


def checked(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.kind in ("run", "output")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit codes: 0 README matches (or was rewritten), 1 a block differs (--check)")
    ap.add_argument("--check", action="store_true", help="compare instead of rewriting")
    ap.add_argument("--list", action="store_true", help="list the blocks and how each is checked")
    ap.add_argument("--only", default="", help="only blocks whose command or id contains this text")
    args = ap.parse_args(argv)
    text = README.read_text()
    blocks = parse(text)
    if args.list:
        for b in blocks:
            how = {"recorded": f"recorded on {b.attrs.get('on', '?')}, not checked"}.get(b.kind, b.kind)
            print(f"README.md:{b.start}  {b.name:<60} {how}")
        return 0
    lines, bad = text.split("\n"), 0
    for b in reversed(checked(blocks)):  # bottom-up, so earlier line numbers stay valid
        if args.only and args.only not in b.name:
            continue
        print(f"running {b.name} ...", file=sys.stderr, flush=True)
        new = produce(blocks, b)
        if args.check:
            ok, why = matches(b.lines, new, b.attrs.get("mask", ""))
            if not ok:
                bad += 1
                print(f"README.md:{b.start}: {b.name}: {why}")
        else:
            lines[b.start:b.end] = new
    if not args.check:
        README.write_text("\n".join(lines))
        print("README.md rewritten from real runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
