"""Serving (Ray Serve, or one process with ``--single-process``) and offline batch scoring (Ray
Data): the optional ``serve`` extra.

Nothing here imports Ray at module import time; ``require_ray()`` turns a missing
install into a ``BackendError`` that names the extra to install.
"""

from __future__ import annotations

from ..extras import require

EXTRA = "serve"


def require_ray():
    """Import and return ``ray`` (with Serve and Data), or raise a BackendError naming the pip extra."""
    for module in ("ray.data", "ray.serve"):
        require(module, EXTRA, "serving and batch scoring")
    return require("ray", EXTRA, "serving and batch scoring")


def require_http() -> None:
    """What serving in one process needs (FastAPI, uvicorn), or a BackendError naming the pip extra."""
    for module in ("fastapi", "uvicorn"):
        require(module, EXTRA, "serving")


__all__ = ["EXTRA", "require_http", "require_ray"]
