"""``apt_hal.explain()``: what apt_hal knows about this machine and what it would run."""

from __future__ import annotations

import dataclasses

from apt_hal import registry
from apt_hal.errors import BackendUnavailableError


@dataclasses.dataclass
class Explanation:
    """What apt_hal knows and would do; ``str()`` gives the table ``apt-hal info`` prints."""

    policy: registry.Policy
    backends: list[dict]
    ops: list[dict]  # per op: {"op": name, "<backend>": implementation or reason}
    plugin_errors: list[tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"policy: backend={self.policy.backend} strict={self.policy.strict}", "", "backends:"]
        rows = [("backend", "device", "status", "detail")]
        for b in self.backends:
            rows.append((b["name"], b["device_type"], "available" if b["available"] else "unavailable", b["detail"]))
        lines += _table(rows)
        names = [b["name"] for b in self.backends if b["available"]]
        lines += ["", "ops (the implementation each available backend resolves to; "
                      "* = what the policy picks for inputs on that backend's device):"]
        rows = [("op", *names)]
        for o in self.ops:
            rows.append((o["op"], *[o[n] for n in names]))
        lines += _table(rows)
        for where, tb in self.plugin_errors:
            lines += ["", f"plugin {where} failed to load:", tb.rstrip()]
        return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def explain() -> Explanation:
    """Every known backend with its availability and reason, and per op the implementation each
    backend resolves to (or why it would fall back to the reference). Activates nothing that is
    unavailable; activates available backends so their implementations are listed."""
    pol = registry.current_policy()
    ops = registry.contracts()
    brows = []
    for name, b in registry.backends().items():
        p = registry.probe(name)
        if p.available:
            try:
                registry.activate(name)
            except BackendUnavailableError:
                p = registry.probe(name)
        brows.append({"name": name, "device_type": registry.device_type_of(name), "available": p.available,
                      "detail": p.detail, "packages": list(b.packages), "install_hint": b.install_hint,
                      "remote": b.remote, "auto": p.auto and b.auto_rank is not None})
    chosen: dict[str, str] = {}  # device type -> backend the policy picks
    if pol.backend == "auto":
        for name in registry.auto_backends():
            chosen.setdefault(registry.device_type_of(name), name)
    else:
        chosen[registry.device_type_of(pol.backend)] = pol.backend
    orows = []
    for op_name in ops:
        row = {"op": op_name}
        for b in brows:
            if not b["available"]:
                row[b["name"]] = "-"
                continue
            cands = registry.implementations(op_name, b["name"])
            cell = " | ".join(c.name.split(".", 1)[1] for c in cands) if cands else "reference (fallback)"
            if chosen.get(b["device_type"]) == b["name"]:
                cell += " *"
            row[b["name"]] = cell
        orows.append(row)
    return Explanation(pol, brows, orows, registry.plugin_errors())
