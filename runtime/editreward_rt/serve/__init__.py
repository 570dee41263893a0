"""Serving (Ray Serve) and offline batch scoring (Ray Data): the optional ``serve`` extra.

Nothing here imports Ray at module import time; ``require_ray()`` turns a missing
install into a ``BackendError`` that names the extra to install.
"""

from __future__ import annotations

from ..errors import BackendError

EXTRA = "editreward-deploy[serve]"


def require_ray():
    """Import and return ``ray`` (with Serve and Data), or raise a BackendError naming the pip extra."""
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            f"serving and batch scoring need Ray Serve and Ray Data ({exc}); install them with "
            f"pip install '{EXTRA}'"
        ) from None
    return ray


__all__ = ["EXTRA", "require_ray"]
