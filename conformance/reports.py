"""The report formats, the matrix, merging and exit codes.

A report is the dict :func:`apt_hal.conformance.runner.run` returns, saved as ``conformance.json``:

* ``schema``: ``"apt_hal.conformance/1"`` (the major version changes when a field changes meaning);
* ``runs``: one entry per run that contributed (several after a merge): ``environment`` (Python,
  OS, package versions, relevant variables) and ``options`` (seed, quick, filters, backends);
* ``backends``: name -> ``run`` (index into ``runs``), ``status`` (RAN, NOT_RUN or INFRA_ERROR),
  ``detail`` (the probe's reason or the activation error), ``device``, ``driver``, ``claims``,
  ``claim_warnings``;
* ``cases``: one record per (backend, case): ``id``, ``op``, ``dtype``, ``case``, ``kind``
  (value/error), ``features``, ``quick``, ``status``, ``message``, ``outputs`` (name -> metrics,
  status and the tolerance entry used), and for FAIL and ERROR ``rerun`` (the command that re-runs
  the case) and ``repro`` (its bundle's folder);
* ``timing``: everything that differs between two runs with the same seed (start times,
  durations), kept apart so that two reports diff cleanly without it.

From it: ``junit.xml`` (any CI shows it natively), ``conformance.md`` (the op x dtype x backend
matrix; GitHub's job summary) and ``conformance.html`` (self-contained, coloured; see report_html).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import xml.etree.ElementTree as ET

from apt_hal.atomic import atomic_write, atomic_write_text
from apt_hal.conformance import compile_matrix, status

SCHEMA_MAJOR = "apt_hal.conformance/1"
FILES = {"json": "conformance.json", "junit": "junit.xml", "markdown": "conformance.md", "html": "conformance.html"}
ICON = {status.PASS: "✅", status.QUALITY_WARNING: "⚠️", status.FAIL: "❌", status.ERROR: "💥", status.XFAIL: "☑️",
        status.XPASS: "❗", status.UNSUPPORTED: "➖", status.NOT_RUN: "⏸️", status.INFRA_ERROR: "🛠️"}
PROBLEMS = (status.FAIL, status.ERROR, status.QUALITY_WARNING, status.XPASS, status.XFAIL, status.INFRA_ERROR)


# ---- views of a report ----------------------------------------------------------------------


def last_line(text: str) -> str:
    """The line that says what happened (an activation error's detail is a whole traceback)."""
    return text.strip().splitlines()[-1] if text.strip() else ""


def matrix(report: dict) -> tuple[list[str], list[tuple[str, str]], dict]:
    """``(backends, rows, cells)``: rows are (op, dtype) in the order cases appear, cells map
    (op, dtype, backend) to a Counter of statuses."""
    backends = list(report["backends"])
    cells: dict = collections.defaultdict(collections.Counter)
    rows = {}
    for c in report["cases"]:
        rows.setdefault((c["op"], c["dtype"]), None)
        cells[c["op"], c["dtype"], c["backend"]][c["status"]] += 1
    return backends, list(rows), cells


def cell_text(counts: collections.Counter) -> tuple[str, str]:
    """(worst status, "3 PASS, 1 UNSUPPORTED") for a matrix cell; ("", "") when empty."""
    if not counts:
        return "", ""
    return status.worst(counts), ", ".join(f"{counts[s]} {s}" for s in status.SEVERITY if counts[s])


def problems(report: dict) -> list[dict]:
    """Cases worth a person's attention, worst first. A backend that failed to activate is one
    problem (its backend entry), not one per case."""
    broken = {n for n, b in report["backends"].items() if b["status"] != "RAN"}
    found = [c for c in report["cases"] if c["status"] in PROBLEMS and c["backend"] not in broken]
    return sorted(found, key=lambda c: status.SEVERITY.index(c["status"]))


def counts(report: dict) -> collections.Counter:
    return collections.Counter(c["status"] for c in report["cases"])


def exit_code(report: dict, require=()) -> int:
    """Bits: 1 a FAIL or ERROR, 4 an INFRA_ERROR, 8 a required backend that did not run."""
    found = counts(report)
    code = status.EXIT_FAILED if found[status.FAIL] or found[status.ERROR] else 0
    if found[status.INFRA_ERROR] or any(b["status"] == "INFRA_ERROR" for b in report["backends"].values()):
        code |= status.EXIT_INFRA
    if required_not_run(report, require):
        code |= status.EXIT_REQUIRED_NOT_RUN
    if compile_matrix.unexplained_failures(report):
        code |= status.EXIT_FAILED
    return code


def required_not_run(report: dict, require=()) -> dict[str, str]:
    """Each backend of ``require`` that did not run, with why (its status and detail's last line)."""
    missing = {}
    for name in require:
        b = report["backends"].get(name)
        if b is None:
            missing[name] = "not in the report (not selected by --backend, or absent from the merged reports)"
        elif b["status"] != "RAN":
            missing[name] = " ".join(filter(None, (b["status"], last_line(b.get("detail") or ""))))
    return missing


def merge(reports: list[dict]) -> dict:
    """One report from several (one per CI job). A backend present in several keeps the report
    where it ran; two reports where one backend ran is an error (which one would be the truth?)."""
    source: dict[str, int] = {}
    for i, rep in enumerate(reports):
        if rep.get("schema") != SCHEMA_MAJOR:
            raise ValueError(f"report {i} has schema {rep.get('schema')!r}, expected {SCHEMA_MAJOR!r}")
        for name, b in rep["backends"].items():
            if name not in source:
                source[name] = i
            elif b["status"] == "RAN":
                if reports[source[name]]["backends"][name]["status"] == "RAN":
                    raise ValueError(f"backend {name!r} ran in two of the merged reports")
                source[name] = i
    out = {"schema": SCHEMA_MAJOR, "runs": [], "backends": {}, "cases": [], "timing": {"runs": [], "cases": {}}}
    for i, rep in enumerate(reports):
        offset = len(out["runs"])
        out["runs"] += rep["runs"]
        out["timing"]["runs"] += rep["timing"]["runs"]
        mine = {name for name, src in source.items() if src == i}
        out["backends"].update({n: {**b, "run": b["run"] + offset} for n, b in rep["backends"].items() if n in mine})
        out["cases"] += [c for c in rep["cases"] if c["backend"] in mine]
        out["timing"]["cases"].update({k: v for k, v in rep["timing"]["cases"].items() if k.split(" ", 1)[0] in mine})
    compiled = [rep["compile"] for rep in reports if "compile" in rep]
    if compiled:
        out["compile"] = compile_matrix.merge(compiled)
    return out


# ---- formats --------------------------------------------------------------------------------


def write_all(report: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    from apt_hal.conformance.report_html import render

    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f for k, f in FILES.items()}
    atomic_write_text(paths["json"], json.dumps(report, indent=1, sort_keys=False) + "\n")
    atomic_write(paths["junit"], lambda tmp: ET.ElementTree(junit(report)).write(tmp, encoding="utf-8",
                                                                                xml_declaration=True))
    atomic_write_text(paths["markdown"], markdown(report))
    atomic_write_text(paths["html"], render(report))
    return list(paths.values())


def load(folder_or_file) -> dict:
    """The report in a folder (its conformance.json) or a file; ValueError if it is not one."""
    p = pathlib.Path(folder_or_file)
    path = p / FILES["json"] if p.is_dir() else p
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{path} is not a JSON report: {e}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA_MAJOR:
        raise ValueError(f"{path} is not a conformance report (no \"schema\": {SCHEMA_MAJOR!r})")
    return report


def junit(report: dict) -> ET.Element:
    """JUnit XML: a testsuite per backend. FAIL: <failure>; ERROR, INFRA_ERROR: <error>; UNSUPPORTED,
    NOT_RUN, XFAIL: <skipped> with the reason; QUALITY_WARNING and XPASS pass with a note."""
    root = ET.Element("testsuites", name="apt_hal conformance")
    by_backend = collections.defaultdict(list)
    for c in report["cases"]:
        by_backend[c["backend"]].append(c)
    times = report["timing"]["cases"]
    for name, b in report["backends"].items():
        cases = by_backend[name]
        n = collections.Counter(c["status"] for c in cases)
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(cases)), failures=str(n[status.FAIL]),
                              errors=str(n[status.ERROR] + n[status.INFRA_ERROR]),
                              skipped=str(n[status.UNSUPPORTED] + n[status.NOT_RUN] + n[status.XFAIL]))
        props = ET.SubElement(suite, "properties")
        for key in ("status", "device", "driver", "detail"):
            ET.SubElement(props, "property", name=key, value=str(b.get(key) or ""))
        for c in cases:
            tc = ET.SubElement(suite, "testcase", classname=f"conformance.{name}.{c['op']}", name=c["id"],
                               time=str(times.get(f"{name} {c['id']}", 0)))
            s, msg = c["status"], c["message"]
            if s == status.FAIL:
                ET.SubElement(tc, "failure", message=msg[:500], type=s).text = msg
            elif s in (status.ERROR, status.INFRA_ERROR):
                ET.SubElement(tc, "error", message=msg[:500], type=s).text = msg
            elif s in (status.UNSUPPORTED, status.NOT_RUN, status.XFAIL):
                ET.SubElement(tc, "skipped", message=f"{s}: {msg}"[:500])
            elif s != status.PASS:
                ET.SubElement(tc, "system-out").text = f"{s}: {msg}"
    return root


def _md(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown(report: dict) -> str:
    backends, rows, cells = matrix(report)
    total = counts(report)
    opts = [r["options"] for r in report["runs"]]
    seeds = sorted({o["seed"] for o in opts})
    lines = ["# apt_hal conformance", "",
             f"{len(report['cases'])} results on {len(backends)} backend(s); seed {', '.join(map(str, seeds))}; "
             f"{'quick suite' if all(o['quick'] for o in opts) else 'full suite'}; "
             + ", ".join(f"{total[s]} {s}" for s in status.SEVERITY if total[s]), "",
             "## Matrix", "", "| op | dtype | " + " | ".join(backends) + " |",
             "|---|---|" + "---|" * len(backends)]
    for op, dt in rows:
        cols = []
        for b in backends:
            worst, detail = cell_text(cells[op, dt, b])
            cols.append(f"{ICON[worst]} {worst} <sub>{detail}</sub>" if worst else "")
        lines.append(f"| {op} | {dt} | " + " | ".join(cols) + " |")
    lines += ["", "## Backends", "", "| backend | status | device | driver | detail |", "|---|---|---|---|---|"]
    for name, b in report["backends"].items():
        icon = {"RAN": "", "NOT_RUN": ICON[status.NOT_RUN], "INFRA_ERROR": ICON[status.INFRA_ERROR]}[b["status"]]
        lines.append(f"| {name} | {f'{icon} ' if icon else ''}{b['status']} | {_md(b.get('device') or '-')} "
                     f"| {_md(b.get('driver') or '-')} "
                     f"| {_md(last_line(b['detail']))} |")
        lines += [f"|  | ⚠️ claims | | | {_md(w)} |" for w in b["claim_warnings"]]
    lines += ["", "## Highest level reached", "", "| backend | level |", "|---|---|"]
    lines += [f"| {name} | {_md(level)} |" for name, level in compile_matrix.levels(report).items()]
    if "compile" in report:
        lines += compile_matrix.markdown(report["compile"])
    found = problems(report)
    lines += ["", f"## Problems ({len(found)})", ""]
    for c in found[:100]:
        repro = f" — repro `{c['repro']}`" if c["repro"] else ""
        lines.append(f"- {ICON[c['status']]} **{c['status']}** `{c['backend']}` `{c['id']}`: "
                     f"{_md(c['message'])}{repro}")
    if len(found) > 100:
        lines.append(f"- … and {len(found) - 100} more in conformance.json")
    lines += ["", "<details><summary>Statuses</summary>", ""]
    lines += [f"- {ICON[s]} **{s}**: {status.MEANING[s]}" for s in status.SEVERITY]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def text_summary(report: dict, limit: int = 20) -> str:
    """The matrix, the backends and the first problems as plain text for a terminal."""
    backends, rows, cells = matrix(report)
    table = [("op", "dtype", *backends)]
    for op, dt in rows:
        table.append((op, dt, *[_short(cells[op, dt, b]) for b in backends]))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    out += ["", "highest level reached:"] + [f"  {n:<14} {lv}" for n, lv in compile_matrix.levels(report).items()]
    if "compile" in report:
        out += compile_matrix.text_lines(report["compile"])
    out += ["", "backends:"]
    for name, b in report["backends"].items():
        out.append(f"  {name:<14} {b['status']:<12} {last_line(b['detail'])}")
        out += [f"  {'':<14} {'':<12} warning: {w}" for w in b["claim_warnings"]]
    found = problems(report)
    if found:
        out += ["", f"problems ({len(found)}, first {min(limit, len(found))}):"]
        out += [f"  {c['status']:<15} {c['backend']} {c['id']}: {_md(c['message'], 300)}" for c in found[:limit]]
    total = counts(report)
    summary = ", ".join(f"{total[s]} {s}" for s in status.SEVERITY if total[s])
    out += ["", "total: " + (summary or "no numeric case ran")]
    return "\n".join(out)


def _short(c: collections.Counter) -> str:
    worst, _ = cell_text(c)
    if not worst:
        return ""
    return f"{worst} {c[worst]}/{sum(c.values())}"


def relocate_repro(report: dict, source: pathlib.Path, target: pathlib.Path) -> None:
    """Make ``repro`` paths of a report loaded from ``source`` relative to ``target`` (merging)."""
    for c in report["cases"]:
        if c["repro"]:
            c["repro"] = os.path.relpath(source / c["repro"], target)
