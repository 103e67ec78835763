"""``conformance.html``: one self-contained page (inline CSS, no script, no external resources)
with the coloured op x dtype x backend matrix, the backends and why any did not run, and every
problem with its metrics, bundle and re-run command."""

from __future__ import annotations

import html

from apt_hal.conformance import compile_matrix, reports, status

COLOURS = {  # background, text: every status also reads as text, never by colour alone
    status.PASS: ("#c8e6c9", "#1b5e20"), status.QUALITY_WARNING: ("#ffe082", "#6d4c00"),
    status.FAIL: ("#ef9a9a", "#7f0000"), status.ERROR: ("#f48fb1", "#6a0036"),
    status.XFAIL: ("#b3e5fc", "#01579b"), status.XPASS: ("#ffcc80", "#8a3c00"),
    status.UNSUPPORTED: ("#eeeeee", "#616161"), status.NOT_RUN: ("#cfd8dc", "#37474f"),
    status.INFRA_ERROR: ("#ce93d8", "#4a148c"),
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #212121; }
h1 { margin: 0 0 4px; font-size: 22px; } h2 { margin: 28px 0 8px; font-size: 17px; }
.sub { color: #616161; margin-bottom: 12px; }
table { border-collapse: collapse; } th, td { border: 1px solid #d0d0d0; padding: 4px 8px; vertical-align: top; }
th { background: #fafafa; text-align: left; }
.matrix td.cell { text-align: center; min-width: 110px; font-weight: 600; }
.matrix td.cell small, .matrix th small { display: block; font-weight: 400; font-size: 11px; }
.matrix th small { color: #546e7a; max-width: 150px; overflow-wrap: anywhere; }
.chip { display: inline-block; padding: 1px 8px; border-radius: 10px; margin: 2px 4px 2px 0; font-weight: 600; }
details { margin: 4px 0; } summary { cursor: pointer; }
code { background: #f5f5f5; padding: 1px 4px; border-radius: 3px; font-size: 12px; }
.msg { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; margin: 6px 0 6px 18px; }
.legend td { font-size: 12px; }
.backends .msg { margin: 0; }
""" + "".join(f".s-{s} {{ background: {bg}; color: {fg}; }}\n" for s, (bg, fg) in COLOURS.items())


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _chip(s: str, text: str = "") -> str:
    return f'<span class="chip s-{s}">{_e(text or s)}</span>'


def _matrix(report: dict) -> str:
    backends, rows, cells = reports.matrix(report)
    head = []
    for name in backends:  # a backend that did not run says why right in its column
        b = report["backends"][name]
        why = "" if b["status"] == "RAN" else f"<small>{_e(b['status'])}: {_e(reports.last_line(b['detail']))}</small>"
        head.append(f"<th>{_e(name)}{why}</th>")
    span = {op: sum(1 for o, _ in rows if o == op) for op, _ in rows}
    body = []
    for i, (op, dt) in enumerate(rows):
        tds = []
        for b in backends:
            worst, detail = reports.cell_text(cells[op, dt, b])
            tds.append(f'<td class="cell s-{worst}" title="{_e(detail)}">{_e(worst)}'
                       f"<small>{_e(detail)}</small></td>" if worst else "<td></td>")
        first = i == 0 or rows[i - 1][0] != op
        op_cell = f'<th rowspan="{span[op]}">{_e(op)}</th>' if first else ""
        body.append(f"<tr>{op_cell}<td>{_e(dt)}</td>{''.join(tds)}</tr>")
    return f'<table class="matrix"><tr><th>op</th><th>dtype</th>{"".join(head)}</tr>{"".join(body)}</table>'


def _backends(report: dict) -> str:
    rows = []
    for name, b in report["backends"].items():
        s = {"RAN": status.PASS, "NOT_RUN": status.NOT_RUN, "INFRA_ERROR": status.INFRA_ERROR}[b["status"]]
        label = "ran" if b["status"] == "RAN" else b["status"]
        warnings = "".join(f"<div>⚠ {_e(w)}</div>" for w in b["claim_warnings"])
        rows.append(f"<tr><th>{_e(name)}</th><td>{_chip(s, label) if s != status.PASS else _e(label)}</td>"
                    f"<td>{_e(b.get('device') or '-')}</td><td>{_e(b.get('driver') or '-')}</td>"
                    f'<td><div class="msg">{_e(b["detail"].strip())}</div>{warnings}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("backend", "status", "device", "driver", "detail"))
    return f'<table class="backends"><tr>{head}</tr>' + "".join(rows) + "</table>"


def _metrics(outputs: dict) -> str:
    if not outputs:
        return ""
    keys = sorted({k for m in outputs.values() for k in m})
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = "".join(f"<tr><th>{_e(n)}</th>" + "".join(f"<td>{_e(m.get(k, ''))}</td>" for k in keys) + "</tr>"
                   for n, m in outputs.items())
    return f"<table><tr><th>output</th>{head}</tr>{rows}</table>"


def _problems(report: dict) -> str:
    found = reports.problems(report)
    if not found:
        return "<p>None.</p>"
    items = []
    for c in found:
        extra = ""
        if c.get("rerun"):
            extra += f"<div>re-run: <code>{_e(c['rerun'])}</code></div>"
        if c.get("repro"):
            extra += f"<div>bundle: <code>{_e(c['repro'])}</code></div>"
        items.append(f"<details><summary>{_chip(c['status'])} <b>{_e(c['backend'])}</b> <code>{_e(c['id'])}</code>"
                     f"</summary><div class=\"msg\">{_e(c['message'])}</div>{_metrics(c['outputs'])}{extra}</details>")
    return "".join(items)


COMPILE_COLOURS = {compile_matrix.COMPILED: "UNSUPPORTED", compile_matrix.FAILED_TO_COMPILE: "FAIL",
                   compile_matrix.UNSUPPORTED: "NOT_RUN"}  # grey for a compile: it is not a pass


def _levels(report: dict) -> str:
    rows = "".join(f"<tr><td>{_e(n)}</td><td>{_e(level)}</td></tr>"
                   for n, level in compile_matrix.levels(report).items())
    return f"<table><tr><th>backend</th><th>highest level reached</th></tr>{rows}</table>"


def _compile(report: dict) -> str:
    if "compile" not in report:
        return "<p>No compile matrix in this report (<code>apt-hal conformance --compile-only</code> makes one).</p>"
    section = report["compile"]
    head = "".join(f"<th>{_e(t)}</th>" for t in section["targets"])
    rows = []
    for backend, per_target in compile_matrix.summary(section).items():
        tds = "".join("<td>" + "".join(_chip(COMPILE_COLOURS[s], f"{n} {s}") for s, n in sorted(per_target[t].items()))
                      + "</td>" for t in section["targets"])
        rows.append(f"<tr><td>{_e(backend)}</td>{tds}</tr>")
    cells = "".join(
        f"<tr><td>{_e(c['backend'])}</td><td>{_e(c['target'])}</td><td><code>{_e(c['kernel'])}</code> "
        f"<small>{_e(compile_matrix.describe_launch(c))}</small></td>"
        f"<td>{_chip(COMPILE_COLOURS[c['status']], c['status'])}"
        f"</td><td class=\"msg\">{_e(compile_matrix.cell_detail(c))}</td></tr>" for c in section["cells"])
    return (f"<p>Triton {_e(section['triton'])}; compiled, never run. Tiles: {_e(section['tiles'])}. "
            f"{_e(section['seconds'])} s.</p><table class=\"matrix\"><tr><th>backend</th>{head}</tr>{''.join(rows)}"
            f"</table><details><summary>every kernel</summary><table><tr><th>backend</th><th>target</th><th>kernel</th>"
            f"<th>status</th><th>detail</th></tr>{cells}</table></details>")


def render(report: dict) -> str:
    total = reports.counts(report)
    chips = "".join(_chip(s, f"{total[s]} {s}") for s in status.SEVERITY if total[s])
    runs = "".join(
        f"<li>seed {_e(r['options']['seed'])}, {'quick' if r['options']['quick'] else 'full'} suite, backends "
        f"{_e(', '.join(r['options']['backends']))}; Python {_e(r['environment']['python'])} on "
        f"{_e(r['environment']['platform'])}; "
        + _e(", ".join(f"{k} {v}" for k, v in r["environment"]["packages"].items()))
        + (f"; started {_e(t['started'])}, {_e(t['seconds'])} s" if t else "") + "</li>"
        for r, t in zip(report["runs"], report["timing"]["runs"] + [None] * len(report["runs"])))
    legend = "".join(f"<tr><td>{_chip(s)}</td><td>{_e(status.MEANING[s])}</td></tr>" for s in status.SEVERITY)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>apt_hal conformance</title><style>{CSS}</style></head>
<body>
<h1>apt_hal conformance</h1>
<div class="sub">{len(report['cases'])} results, {len(report['backends'])} backend(s). {chips}</div>
<ul>{runs}</ul>
<h2 id="matrix">Matrix: op &times; dtype &times; backend</h2>
{_matrix(report)}
<h2 id="backends">Backends</h2>
{_backends(report)}
<h2 id="levels">Highest level reached</h2>
{_levels(report)}
<h2 id="compile">Compile matrix</h2>
{_compile(report)}
<h2 id="problems">Problems ({len(reports.problems(report))})</h2>
{_problems(report)}
<h2 id="statuses">Statuses</h2>
<table class="legend">{legend}</table>
</body></html>
"""
