"""``apt-hal info``: what apt_hal finds on this machine and what it would run."""

from __future__ import annotations

import argparse
import json
import platform

from apt_hal.cli_errors import EXIT_CODES_EPILOG

HELP = "show backends, their availability and reasons, and the implementation serving each op"
EPILOG = """examples:
  apt-hal info                      the tables below, for the current policy
  apt-hal info --json               the same, machine-readable
  APT_HAL_BACKEND=cpu apt-hal info  what a process with that policy would do

""" + EXIT_CODES_EPILOG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    import torch

    import apt_hal

    exp = apt_hal.explain()
    env = {"apt_hal": apt_hal.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(apt_hal.get_device())}
    if args.json:
        print(json.dumps({"environment": env, "policy": vars(exp.policy), "backends": exp.backends,
                          "ops": exp.ops, "plugin_errors": [{"entry_point": w, "traceback": t}
                                                            for w, t in exp.plugin_errors]}, indent=2))
    else:
        print("  ".join(f"{k} {v}" for k, v in env.items()))
        print(exp)
    return 0
