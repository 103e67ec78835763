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


def import_binding(module: str, package: str):
    """Import a vendor-library binding module: ``(module, "")``, or ``(None, why)`` when the
    library (pip name ``package``) is not installed or does not load here, never an exception."""
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError as e:
        return None, f"{package} is not installed ({e.name} not found)"
    except Exception as e:  # a vendor library that is installed but cannot load on this machine
        return None, f"{package} does not load here: {type(e).__name__}: {e}"
