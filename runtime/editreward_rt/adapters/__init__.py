"""Reward functions for trainers that call ``editreward serve``, each a file a trainer's config
names by path (or module) and function name: ``verl_omni.compute_score``, ``flow_grpo.editreward_score``
(Flow-GRPO's ``reward_fn`` convention) and ``trl.editreward`` (a TRL async reward function).
They reach the service through ``RewardClient``; their modules import absolutely, so a trainer
may load them from the file path alone.

Common settings come from the environment, as these trainers pass nothing else through:
``EDITREWARD_URL`` (the service; default http://127.0.0.1:8000), ``EDITREWARD_TOKEN`` (its
``--token``), ``EDITREWARD_SOURCE_ROOT`` (the folder that source-image file names are under).
"""

from __future__ import annotations

import os
from pathlib import Path

from editreward_rt.client import RewardClient
from editreward_rt.errors import ImageError

DEFAULT_URL = "http://127.0.0.1:8000"
_CLIENTS: dict[tuple, RewardClient] = {}


def client(url: str | None = None, token: str | None = None, timeout: float = 300.0) -> RewardClient:
    """One client per (url, token, timeout) per process: trainers call the reward per batch or per sample."""
    key = (url or os.environ.get("EDITREWARD_URL", DEFAULT_URL), token or os.environ.get("EDITREWARD_TOKEN"), timeout)
    if key not in _CLIENTS:
        _CLIENTS[key] = RewardClient(key[0], timeout=timeout, token=key[1])
    return _CLIENTS[key]


def source_image(value, root: str | os.PathLike | None = None):
    """A source image as a trainer's data carries it -> what ``RewardClient`` sends: encoded bytes
    (or ``{"bytes": ...}``, the Hugging Face image feature) as they are; a file name is read from
    under ``root`` (default ``$EDITREWARD_SOURCE_ROOT``) and may not leave it; arrays and PIL images as they are."""
    if isinstance(value, dict) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, (str, os.PathLike)):
        return value
    root = root or os.environ.get("EDITREWARD_SOURCE_ROOT")
    if root is None:
        raise ImageError(f"source image {str(value)!r} is a file name: set source_root or EDITREWARD_SOURCE_ROOT")
    base = Path(root).resolve()
    path = (base / value).resolve()
    if not path.is_relative_to(base):
        raise ImageError(f"source image {str(value)!r} is outside the source root {base}")
    return str(path)
