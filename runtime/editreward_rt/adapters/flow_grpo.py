"""Flow-GRPO's reward-function convention, scored by ``editreward serve``.

``editreward_score(device)`` returns ``_fn(images, prompts, metadata, ref_images=None,
only_strict=True) -> (scores, info)``, the shape of the scorers in ``flow_grpo/rewards.py`` (add it
to that file's ``score_functions`` and name it in ``config.reward_fn``). The source of image i is
``ref_images[i]`` (Flow-GRPO's edit scripts pass them), else ``metadata[i]["source"]``: image bytes,
or a file name under ``$EDITREWARD_SOURCE_ROOT``. Edit-R1 needs none of this: point its
``REWARD_SERVER`` at the service, which answers its ``/mode/logits_non_cot`` itself.
"""

from __future__ import annotations

from editreward_rt.adapters import client, source_image
from editreward_rt.rl import FlowGrpoReward

SOURCE_KEY = "source"


def editreward_score(device=None, url: str | None = None, token: str | None = None):
    """A Flow-GRPO scorer factory (``device`` is Flow-GRPO's argument; the service owns the model)."""
    del device
    reward = FlowGrpoReward(client(url, token), source_key=SOURCE_KEY)

    def _fn(images, prompts, metadata, ref_images=None, only_strict=True):
        if ref_images is None and metadata is not None:  # file names -> paths under the source root
            metadata = [{**m, SOURCE_KEY: source_image(m[SOURCE_KEY])} if isinstance(m, dict) and SOURCE_KEY in m
                        else m for m in metadata]
        return reward(images, prompts, metadata, ref_images=ref_images, only_strict=only_strict)

    return _fn
