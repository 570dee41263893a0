"""EditReward as the reward of RL training (GRPO and kin): group-relative advantages and the
reward-function conventions of the trainers.

A scorer here is anything with ``score_groups(groups, errors="return")``: a ``Scorer``, a
``BatchingScorer`` (shared by several trainer threads) or a ``client.RewardClient`` (a remote
``editreward serve``). Edits of one (instruction, source) are scored as one group, so the source is
encoded once for all of them. A triple that cannot be scored (a corrupt image, say) costs its own
reward only: it gets ``error_reward`` and its error is logged (and returned where the trainer's
convention has room for it).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .errors import EditRewardError, InputError
from .images import as_images, identity
from .scorer import Score

log = logging.getLogger(__name__)

# Added to each group's standard deviation: a group whose edits all score the same gets
# advantages of 0 instead of 0/0. 1e-4 as TRL's GRPOTrainer and flow_grpo use, far below the
# spread of EditReward's mu between distinct edits.
ADVANTAGE_EPS = 1e-4
_HERMITE = np.polynomial.hermite_e.hermegauss(64)  # nodes and weights for E over N(0, 1)


def bt_preference(a: Score, b: Score) -> float:
    """P(a preferred over b) as EditReward was trained to model it (``loss_type: uncertainty`` in
    upstream's trainer): E[sigmoid(z)] with z ~ N(mu_a - mu_b, sigma_a^2 + sigma_b^2), computed by
    Gauss-Hermite quadrature (upstream samples it). ``scorer.preference`` is P(z > 0), a different number."""
    nodes, weights = _HERMITE
    z = (a.mu - b.mu) + math.sqrt(a.sigma**2 + b.sigma**2) * nodes
    return float(np.sum(weights / (1.0 + np.exp(-z))) / math.sqrt(2.0 * math.pi))


def _standardise(values: np.ndarray, eps: float) -> np.ndarray:
    return (values - values.mean()) / (values.std() + eps)  # population std (ddof 0)


def group_advantages(groups: list[list[Score]], method: str = "zscore", eps: float = ADVANTAGE_EPS) -> list[list[float]]:
    """Each group's advantages. ``zscore``: (mu - mean(mu)) / (std(mu) + eps). ``preference``: each
    edit's mean ``bt_preference`` over the other edits of its group (its expected win rate), then
    standardised the same way; it weighs each margin by both edits' uncertainty."""
    if method not in ("zscore", "preference"):
        raise ValueError(f"method must be zscore or preference, not {method!r}")
    out = []
    for g, scores in enumerate(groups):
        if not all(isinstance(s, Score) for s in scores):
            raise InputError(f"group {g} holds an error, not only scores: drop or replace failed edits first")
        if method == "zscore":
            values = np.array([s.mu for s in scores], dtype=np.float64)
        else:
            values = np.array([np.mean([bt_preference(a, b) for j, b in enumerate(scores) if j != i]) if len(scores) > 1
                               else 0.5 for i, a in enumerate(scores)])
        out.append(_standardise(values, eps).tolist() if len(values) else [])
    return out


# ---------------------------------------------------------------- scoring a trainer's flat batch


def score_flat(scorer, instructions: list[str], sources: list, edits: list) -> list:
    """One Score or error per edit, in order; edits of one (instruction, source) scored as one group."""
    groups, order, where = {}, {}, []
    for i, (instruction, source) in enumerate(zip(instructions, sources)):
        key = (instruction, identity(source))
        group = groups.setdefault(key, (instruction, source, []))
        where.append((order.setdefault(key, len(order)), len(group[2])))
        group[2].append(edits[i])
    scored = scorer.score_groups(list(groups.values()), errors="return")
    return [scored[g][e] for g, e in where]


def rewards(outcomes: list, error_reward):
    """Scores -> their mu; an error -> ``error_reward`` (logged)."""
    out = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Score):
            out.append(outcome.mu)
        else:
            log.warning("edit %d got no reward (%s): %s", i, outcome.kind, outcome)
            out.append(error_reward)
    return out


def _text(prompt) -> str:
    """A prompt as text: a string, or a conversation's last user message (TRL's conversational form)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(list(prompt)):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise InputError("a conversational prompt without a user message")


# ---------------------------------------------------------------- flow_grpo


class FlowGrpoReward:
    """A flow_grpo reward function: ``reward_fn(images, prompts, metadata)`` (and the edit scripts'
    ``reward_fn(images, prompts, metadata, ref_images, only_strict=...)``) -> ``(scores, info)``,
    as flow_grpo's ``rewards.py`` scorers return (scores: a float array, one per image).

    ``images``: the edited images, a torch tensor [B, C, H, W] in [0, 1] (flow_grpo's sampling
    output), a numpy [B, H, W, C] array (uint8, or float in [0, 1]), or a list of PIL images.
    The source of image i is ``ref_images[i]`` when given (flow_grpo's edit scripts pass the
    reference images), else ``metadata[i][source_key]`` (an image, path or encoded bytes). The
    instruction is ``metadata[i][instruction_key]`` when present, else ``prompts[i]``.
    ``info["errors"]``: {index: error dict} for images that got ``error_reward``.
    """

    def __init__(self, scorer, source_key: str = "source", instruction_key: str = "instruction",
                 error_reward: float = float("nan")):
        self.scorer, self.source_key, self.instruction_key, self.error_reward = scorer, source_key, instruction_key, error_reward

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict: bool = True):
        del only_strict  # flow_grpo's GenEval flag; EditReward has no strict variant
        prompts = list(prompts)
        edits = as_images(images, len(prompts))
        meta = [m if isinstance(m, dict) else {} for m in (metadata if metadata is not None else [{}] * len(prompts))]
        if ref_images is not None:
            sources = as_images(ref_images, len(prompts))
        else:
            missing = [i for i, m in enumerate(meta) if self.source_key not in m]
            if missing:
                raise InputError(f"no source image for images {missing[:5]}: pass ref_images or metadata[i][{self.source_key!r}]")
            sources = [m[self.source_key] for m in meta]
        instructions = [m.get(self.instruction_key, p) for m, p in zip(meta, prompts)]
        outcomes = score_flat(self.scorer, instructions, sources, edits)
        errors = {i: o.to_dict() for i, o in enumerate(outcomes) if isinstance(o, EditRewardError)}
        return np.asarray(rewards(outcomes, self.error_reward), dtype=np.float32), {"errors": errors}


# ---------------------------------------------------------------- TRL


class TrlReward:
    """A TRL reward function: ``reward_func(prompts=..., completions=..., **kwargs) -> list[float | None]``,
    as ``GRPOTrainer`` calls it (every dataset column except prompt/completion arrives as a kwarg,
    repeated for each generation). For an image-editing trainer on TRL, the edited image of each
    completion is ``kwargs[edited_column][i]`` (or the completion itself when it is an image),
    its source ``kwargs[source_column][i]``, its instruction ``kwargs[instruction_column][i]`` when
    that column exists, else the prompt (a conversation's last user text). A triple that cannot be
    scored gets ``error_reward``; None, TRL's "no reward" (it becomes NaN, ignored in its mean)."""

    __name__ = "editreward"  # what TRL logs the reward under

    def __init__(self, scorer, source_column: str = "source", edited_column: str = "edited",
                 instruction_column: str = "instruction", error_reward: float | None = None):
        self.scorer, self.error_reward = scorer, error_reward
        self.source_column, self.edited_column, self.instruction_column = source_column, edited_column, instruction_column

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        n = len(prompts)
        if self.source_column not in kwargs:
            raise InputError(f"no {self.source_column!r} column: the dataset must carry each prompt's source image")
        edits = kwargs.get(self.edited_column)
        if edits is None:
            if any(isinstance(c, str) for c in completions):
                raise InputError(f"completions are text and there is no {self.edited_column!r} column of edited images")
            edits = completions
        instructions = kwargs.get(self.instruction_column) or [_text(p) for p in prompts]
        outcomes = score_flat(self.scorer, list(instructions), list(kwargs[self.source_column]), as_images(edits, n))
        return rewards(outcomes, self.error_reward)
