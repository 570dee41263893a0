"""The one guard for optional imports: a missing library is an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendError


def require(module: str, extra: str, what: str, note: str = "", error: type[Exception] = BackendError) -> ModuleType:
    """Import ``module`` or raise ``error`` saying that ``what`` needs it and which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'editreward-deploy[{extra}]'" + (f" {note}" if note else "")
        raise error(f"{what} needs {module.split('.')[0]} ({exc}): {hint}") from exc


def missing(modules, extra: str, what: str, note: str = "", error: type[Exception] = BackendError) -> None:
    """Raise ``error`` naming the extra when any of ``modules`` cannot be found (nothing is imported)."""
    import importlib.util

    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        hint = f"pip install 'editreward-deploy[{extra}]'" + (f" {note}" if note else "")
        raise error(f"{what} needs {', '.join(absent)}: {hint}")
