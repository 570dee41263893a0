"""verl-omni's reward-function interface, scored by ``editreward serve``.

verl-omni's own HTTP scorer client sends only the generated image and ``ground_truth``, so it
cannot carry the source an edit is scored against. Point the reward function at this file instead
(``path=``, ``name=compute_score``; extra keys of that config arrive as keyword arguments): its
Qwen-Image-Edit data keeps the instruction in ``ground_truth`` and the source in ``extra_info``
(``source_img``: ``{"bytes": PNG}``, or ``image``: a file name under ``source_root``).
verl-omni gathers one call per sample; the service merges concurrent calls into batches.
"""

from __future__ import annotations

import asyncio

from editreward_rt.adapters import client, source_image
from editreward_rt.errors import InputError
from editreward_rt.images import as_images

SOURCE_KEYS = ("source_img", "image")  # verl-omni's qwenimageedit data: PNG bytes, then the file name


async def compute_score(solution_image, ground_truth: str, extra_info: dict | None = None, server_url: str | None = None,
                        source_root: str | None = None, token: str | None = None, timeout: float = 300.0,
                        **kwargs) -> dict:
    """-> ``{"score": mu}``. ``solution_image``: the edited image, a [C, H, W] (or [1, C, H, W])
    tensor or an [H, W, C] array. ``server_url``: default ``$EDITREWARD_URL``. A triple the
    service cannot score raises its typed error, as verl-omni's own client raises on an error."""
    del kwargs  # verl-omni also passes data_source, reward_router_address, model_name, ...
    info = extra_info or {}
    key = next((k for k in SOURCE_KEYS if info.get(k) is not None), None)
    if key is None:
        raise InputError(f"extra_info has no source image (one of {list(SOURCE_KEYS)})")
    edited = as_images(solution_image)[0]  # a batch of one ([1, C, H, W]) or one image
    instruction = ground_truth or info.get("instruction")
    service = client(server_url, token, timeout)
    score = await asyncio.to_thread(service.score, instruction, source_image(info[key], source_root), edited)
    return {"score": score.mu}
