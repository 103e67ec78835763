"""The ``apt-hal`` command line. Each subcommand lives in the module that owns its work (with
``HELP``, optional ``EPILOG``, ``add_arguments(parser)`` and ``run(args) -> exit code``); this file
only wires them together, so ``apt-hal --help`` lists everything in one place, and reports every
user error the same way (:mod:`apt_hal.cli_errors`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from apt_hal import __version__
from apt_hal.cli_errors import run_command

SUBCOMMANDS = {
    "info": "apt_hal.info",
    "train": "apt_hal.models.train",
    "generate": "apt_hal.models.cli",
    "chat": "apt_hal.models.chat",
    "conformance": "apt_hal.conformance.cli",
    "serve": "apt_hal.backends.huawei_cloud.serve",
}

EPILOG = """Choose the backend in code with apt_hal.use("cuda-triton") (default "auto": the best available
for the inputs' device, CUDA > HPU > NPU > XPU > CPU), or with the APT_HAL_BACKEND environment
variable. APT_HAL_STRICT=1 turns every fallback to the reference into an error; APT_HAL_CHECKS=values
adds value checks (NaN, index ranges) to every backend call. Run 'apt-hal COMMAND --help' for more,
and for each command's exit codes (2: a usage error, reported in one line on stderr).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apt-hal", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="apt_hal: write a transformer once against four op contracts; run it on any backend, "
                    "proven equal to the CPU reference.")
    parser.add_argument("--version", action="version", version=f"apt-hal {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        sp = subs.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=getattr(mod, "EPILOG", None),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return run_command(f"apt-hal {args.command}", args._run, args)


if __name__ == "__main__":
    sys.exit(main())
