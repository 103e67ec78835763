"""``apt-hal conformance``: run the suite on backends, or merge the reports of several runs."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from apt_hal.cli_errors import UsageError, check_writable_folder, did_you_mean

HELP = "check backends against the CPU reference and write JSON, JUnit, Markdown and HTML reports"
EPILOG = """exit codes (bits, added together):
  0  no FAIL, ERROR or INFRA_ERROR (QUALITY_WARNING, XFAIL, XPASS, UNSUPPORTED and NOT_RUN do not
     fail a run; the reports list each with its reason)
  1  a case FAILed, or raised an ERROR
  2  usage error
  4  INFRA_ERROR: a backend is available but failed to activate, or the harness itself failed
     (with --merge: a folder held no report)
  8  a backend named in --require did not run
  e.g. 5 = FAIL + INFRA_ERROR, 9 = FAIL + a required backend that did not run

examples:
  apt-hal conformance --backend all --report out/
      the full suite on every backend; unavailable ones are NOT_RUN with the probe's reason
  TRITON_INTERPRET=1 apt-hal conformance --backend cpu,cuda-triton --quick --require cpu,cuda-triton --report out/
      CI on a CPU machine: the Triton kernels in Triton's interpreter
  apt-hal conformance --backend cuda-triton --case 'rotary/bfloat16/*' --report out/
      some cases (ids or glob patterns; see --list), quick or not
  apt-hal conformance --merge reports/*/ --require cpu,cuda-triton --report merged/
      one matrix from the reports of several jobs
  apt-hal conformance --quick --write-golden golden/   then, on the vendor host:
  apt-hal conformance --backend npu --golden golden/ --require npu --report out/
      golden data: inputs and CPU reference outputs as safetensors, checked without the reference

Failing cases get a bundle in REPORT/repro/ (inputs as safetensors, expected and actual outputs,
the command that re-runs the case). Reports: conformance.json, junit.xml, conformance.md,
conformance.html. Tolerances: apt_hal/conformance/tolerances.json; known failures:
apt_hal/conformance/known_failures.json.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="all", metavar="NAMES",
                   help="'all' (default) or comma-separated backend names, e.g. cpu,cuda-triton")
    p.add_argument("--report", default="conformance-report", metavar="DIR",
                   help="folder for the reports (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="the quick suite: small shapes, each feature once")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: %(default)s)")
    p.add_argument("--op", action="append", metavar="OPS", help="only these ops (comma-separated; repeatable)")
    p.add_argument("--case", action="append", metavar="ID", help="only cases whose id matches (glob; repeatable)")
    p.add_argument("--require", default="", metavar="NAMES",
                   help="comma-separated backends that must run: exit code 8 if one did not")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge the reports in these folders instead of running")
    p.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    p.add_argument("--write-golden", metavar="DIR",
                   help="write the selected cases' inputs and CPU reference outputs to DIR (safetensors) and exit")
    p.add_argument("--golden", metavar="DIR",
                   help="check the backends against the golden data in DIR instead of running the CPU reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--compile-only", action="store_true",
                   help="compile every Triton kernel of the backends for --target GPUs (no GPU needed; nothing "
                        "runs); exit code 1 if one fails to compile and is not in known_compile_failures.json")
    p.add_argument("--target", default="gfx942,gfx950,sm_90,sm_100", metavar="TARGETS",
                   help="with --compile-only: comma-separated GPU targets (default: %(default)s)")
    p.add_argument("--compile-jobs", type=int, default=2, metavar="N",
                   help="with --compile-only: compiler processes (default: %(default)s)")


def _names(values) -> list[str]:
    return [n.strip() for v in (values or []) for n in v.split(",") if n.strip()]


class ProgressBar:
    """A progress line on stderr: redrawn in place on a terminal; on a CI log (not a terminal) one
    line per tenth, so the log stays readable. Twenty lines do not justify a dependency."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty, self.shown, self.t0 = stream, stream.isatty(), -1, time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        frac = done / total
        elapsed = f"{time.perf_counter() - self.t0:.0f}s"
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {done}/{total} {elapsed} {label[:70]:<70}")
            if done == total:
                self.stream.write("\n")
        elif int(10 * frac) != self.shown:
            self.shown = int(10 * frac)
            self.stream.write(f"conformance: {done}/{total} ({100 * frac:.0f}%, {elapsed}) {label}\n")
        self.stream.flush()


def _finish(report: dict, out: pathlib.Path, require: list[str], extra_code: int = 0) -> int:
    from apt_hal.conformance import reports

    paths = reports.write_all(report, out)
    print(reports.text_summary(report))
    print("\nreports: " + ", ".join(str(p) for p in paths))
    for name, why in reports.required_not_run(report, require).items():
        print(f"required backend {name} did not run: {why}")
    code = reports.exit_code(report, require) | extra_code
    print(f"exit code {code}" + ("" if code else " (no FAIL, ERROR or INFRA_ERROR)")
          + " (see 'apt-hal conformance --help')" * bool(code))
    return code


def _merge(args, out: pathlib.Path, require: list[str]) -> int:
    from apt_hal.conformance import reports, status

    loaded, missing = [], 0
    for folder in args.merge:
        try:
            rep = reports.load(folder)
        except ValueError as e:
            raise UsageError(f"--merge {folder}: {e}") from None
        except FileNotFoundError:
            print(f"apt-hal conformance: no report in {folder} (did its job stop before writing one?)", file=sys.stderr)
            missing = status.EXIT_INFRA
            continue
        reports.relocate_repro(rep, pathlib.Path(folder), out)
        loaded.append(rep)
    return _finish(reports.merge(loaded), out, require, missing)


def _backend_names(flag: str, value: str, known: list[str], allow_all: bool) -> list[str]:
    """The backends ``value`` names: 'all' (where allowed) or known names, comma-separated."""
    choices = "'all' or " * allow_all + "comma-separated backend names"
    if allow_all and value.strip() == "all":
        return known
    names = _names([value])
    if not names and allow_all:
        raise UsageError(f"{flag} {value!r} names no backend; give {choices} (known: {', '.join(known)})")
    for name in names:
        if name not in known:
            raise UsageError(f"{flag}: unknown backend {name!r}{did_you_mean(name, known)} "
                             f"(known: {', '.join(known)}; give {choices})")
    return names


def run(args: argparse.Namespace) -> int:
    from apt_hal import registry
    from apt_hal.conformance import runner

    out = pathlib.Path(args.report)
    known = list(registry.backends())
    require = _backend_names("--require", args.require, known, allow_all=False)
    if not args.list:
        check_writable_folder(out, "--report")  # before hours of cases, not after them
    if args.merge:
        return _merge(args, out, require)
    backends = _backend_names("--backend", args.backend, known, allow_all=True)
    cases = runner.select_cases(_names(args.op), args.case, args.quick)
    if args.list:
        for c in cases:
            print(f"{c.id}  {'quick ' if c.quick else ''}{' '.join(c.features)}".rstrip())
        return 0
    if not cases:
        raise UsageError("no case matches the selection (see --list)")
    if args.compile_only:
        from apt_hal.conformance import compile_matrix

        return compile_matrix.main(args, backends, out)
    if args.write_golden:
        from apt_hal.conformance import golden

        written = golden.write(pathlib.Path(args.write_golden), cases, seed=args.seed)
        print(f"wrote {len(written)} golden case(s) to {args.write_golden}")
        return 0
    progress = None if args.no_progress else ProgressBar()
    if args.golden:
        from apt_hal.conformance import golden

        report = golden.run(backends, pathlib.Path(args.golden), cases, progress=progress)
    else:
        report = runner.run(backends, seed=args.seed, quick=args.quick, ops=_names(args.op), patterns=args.case,
                            report_dir=out, progress=progress)
    return _finish(report, out, require)
