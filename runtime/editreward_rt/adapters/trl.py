"""A TRL ``GRPOTrainer`` reward function, scored by ``editreward serve``: ``editreward`` (async).

TRL passes every dataset column as a keyword argument, repeated per generation: the edited image
is the ``edited`` column (or the completion itself when it is an image), its source the ``source``
column (image bytes, a PIL image, or a file name under ``$EDITREWARD_SOURCE_ROOT``), the
instruction the ``instruction`` column or else the prompt. Name it in TRL's GRPO script as
``--reward_funcs editreward_rt.adapters.trl.editreward``, or pass it in ``reward_funcs=[...]``.
A triple that cannot be scored gets None (TRL's "no reward"), and its error is logged.
"""

from __future__ import annotations

import asyncio

from editreward_rt.adapters import client, source_image
from editreward_rt.rl import TrlReward

SOURCE_COLUMN = "source"


async def editreward(prompts, completions, **kwargs) -> list[float | None]:
    if SOURCE_COLUMN in kwargs:
        kwargs[SOURCE_COLUMN] = [source_image(s) for s in kwargs[SOURCE_COLUMN]]
    reward = TrlReward(client(), source_column=SOURCE_COLUMN)
    return await asyncio.to_thread(reward, prompts, completions, **kwargs)
