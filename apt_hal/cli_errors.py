"""How every apt_hal command line reports a user's mistake: one line on stderr naming the argument
or file and what is wrong, and exit code 2; never a traceback.

A user error is an :class:`~apt_hal.errors.AptHalError` (a contract, backend or checkpoint
problem), an ``OSError`` (a path that is missing, a file where a folder belongs, no permission, a
full disk), a ``ValueError`` (a bad value or file content; ``json.JSONDecodeError`` is one), or a
missing package of an optional extra. Anything else is a bug in apt_hal and keeps its traceback.
"""

from __future__ import annotations

import difflib
import pathlib
import sys
import tempfile
from typing import Callable, Optional

from apt_hal.errors import AptHalError

EXIT_USAGE = 2

# The extra of pyproject.toml that installs each optional top-level package.
EXTRA_OF_PACKAGE = {"tokenizers": "models", "safetensors": "models", "onnx": "export", "onnxscript": "export",
                    "onnx_ir": "export", "onnxruntime": "export", "triton": "triton"}

EXIT_CODES_EPILOG = """exit codes:
  0  done
  2  usage error: a bad argument, an unreadable or invalid file, an unavailable backend or device,
     or a missing optional package (the message says which extra to install)
"""


class UsageError(AptHalError, ValueError):
    """A command-line argument (or a file it names) that the command cannot use."""


def missing_extra(e: ImportError) -> Optional[str]:
    """``pip install 'apt-hal[EXTRA]'`` advice when ``e`` is a missing optional package, else None."""
    package = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    if not isinstance(e, ModuleNotFoundError) or extra is None:
        return None
    return f"this needs the optional package {package}: pip install 'apt-hal[{extra}]'"


def describe(e: BaseException) -> str:
    """``e`` as one line: an OSError as 'PATH: reason', any other message with its lines joined."""
    if isinstance(e, OSError) and not isinstance(e, AptHalError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{where}: {e.strerror}" if where else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def run_command(prog: str, command: Callable[..., int], *args) -> int:
    """``command(*args)``, with a user error printed as ``PROG: error: ...`` and exit code 2."""
    try:
        return command(*args)
    except ImportError as e:
        advice = missing_extra(e)
        if advice is None:
            raise
        message = advice
    except (AptHalError, OSError, ValueError) as e:
        message = describe(e)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def check_writable_folder(path, flag: str) -> None:
    """Raise UsageError naming ``flag`` unless ``path`` is, or can be created as, a folder this
    process can write in; so a bad destination fails before any work, not after it. Creates nothing."""
    path = pathlib.Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        why = "is a file, not a folder" if existing == path else f"{existing} is a file, so no folder can be made in it"
        raise UsageError(f"{flag} {path}: {why}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {existing}: {e.strerror or e}") from None


def did_you_mean(name: str, known) -> str:
    """'; did you mean 'x'?' naming the known names that ``name`` begins or resembles, or ''."""
    close = [k for k in known if name and k.startswith(name)] or difflib.get_close_matches(name, known)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


# Device types a user may mean; torch knows more (mkldnn, opengl, ...) that nobody types.
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "hpu", "npu", "mps", "meta")
_DEVICE_ALIASES = {"gpu": "cuda"}


def parse_device(text: str, flag: str = "--device"):
    """The ``torch.device`` ``text`` names, if this machine has it; UsageError otherwise (with the
    closest known names for a type torch does not know)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        kind = text.split(":")[0].strip().lower()
        hint = did_you_mean(_DEVICE_ALIASES.get(kind, kind), _DEVICE_TYPES)
        raise UsageError(f"{flag} {text!r} is not a device (e.g. cpu, cuda, cuda:1){hint}") from None
    if device.type in ("cpu", "meta"):
        return device
    module = getattr(torch, device.type, None)
    count = module.device_count() if module is not None and module.is_available() else 0
    if count == 0:
        raise UsageError(f"{flag} {text}: this machine has no {device.type} device (torch {torch.__version__} "
                         f"finds none); use --device cpu")
    if device.index is not None and device.index >= count:
        raise UsageError(f"{flag} {text}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}")
    return device
