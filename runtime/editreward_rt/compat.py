"""Drop-in for upstream's ``EditRewardInferencer``: existing code ports by changing one import.

    from editreward_rt.compat import EditRewardInferencer
    inferencer = EditRewardInferencer(checkpoint_path="exported-or-checkpoint", device="cpu")
    rewards = inferencer.reward(prompts, image_src, image_paths)   # [B, 2]: mu, log_sigma

``rewards`` is a float32 numpy array (upstream returns a torch tensor; ``rewards[i][0].item()``
works on both). ``config_path`` is accepted for signature compatibility: the model's own
files say everything it used to.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .scorer import Scorer


class EditRewardInferencer:
    def __init__(self, config_path=None, checkpoint_path=None, device="cpu", backend=None, mode="fast", **load_kwargs):
        if checkpoint_path is None:
            raise InputError("checkpoint_path is required (a checkpoint, hub id or exported model folder)")
        self.config_path = config_path
        self.scorer = Scorer.load(checkpoint_path, backend=backend, mode=mode, device=device, **load_kwargs)

    def reward(self, prompts, image_src, image_paths) -> np.ndarray:
        if not (len(prompts) == len(image_src) == len(image_paths)):
            raise InputError(f"prompts, image_src and image_paths differ in length: "
                             f"{len(prompts)}, {len(image_src)}, {len(image_paths)}")
        scores = self.scorer.score_batch(list(zip(prompts, image_src, image_paths)))
        return np.array([[s.mu, s.log_sigma] for s in scores], dtype=np.float32).reshape(-1, 2)
