"""Helpers for probes: answer cheaply, import nothing heavy."""

import glob
import importlib.util


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (its parent package is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def device_files(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))
