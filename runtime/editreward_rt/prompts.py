"""Prompt assembly and tokenization with the ``tokenizers`` library alone.

The base model's chat template is rendered once (at load or export time) for one user
message [image, image, text]; what the runtime keeps is that rendering with a sentinel
where the text goes. Scoring then only formats the rubric, expands each ``<|image_pad|>``
to the image's token count (as the Qwen2.5-VL processor does) and tokenizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from .errors import CheckpointError, InstructionError, PromptTooLongError
from .spec import ModelSpec
from .templates import Templates

TEXT_SENTINEL = "\u0000EDITREWARD_TEXT\u0000"
IMAGE_PAD = "<|image_pad|>"
REWARD_TOKEN = "<|Reward|>"


def render_chat_template(template: str) -> str:
    """Render the base chat template for [image, image, text] with the generation prompt."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, **kw)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": TEXT_SENTINEL}]}]
    rendered = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    if rendered.count(TEXT_SENTINEL) != 1 or rendered.split(TEXT_SENTINEL)[0].count(IMAGE_PAD) != 2:
        raise CheckpointError("the chat template does not render one text part and two image placeholders")
    return rendered


def read_chat_template(base: Path) -> str:
    """The chat template of a base model folder, from whichever file holds it."""
    for name in ("chat_template.jinja",):
        if (base / name).is_file():
            return (base / name).read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = base / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    raise CheckpointError(f"no chat template found in {base} (chat_template.jinja, chat_template.json or tokenizer_config.json)")


def load_tokenizer(path: Path, expected_size: int | None = None) -> Tokenizer:
    """Load tokenizer.json and add <|Reward|> as upstream does, checking it against the embedding."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
    if tokenizer.token_to_id(REWARD_TOKEN) is None:
        tokenizer.add_special_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)])
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f"tokenizer has {size} tokens with <|Reward|> but the checkpoint's embedding has {expected_size} rows: "
            "wrong base model for this checkpoint?"
        )
    return tokenizer


@dataclass(frozen=True)
class Prompt:
    """Token ids of one rubric pass and where its images and reward token sit."""

    ids: np.ndarray  # [L] int64, the full sequence the reference runs
    reward_pos: int  # index of <|Reward|>; the fast path stops here

    @property
    def scored_ids(self) -> np.ndarray:
        return self.ids[: self.reward_pos + 1]


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, chat_text: str, templates: Templates, spec: ModelSpec):
        self.tokenizer = tokenizer
        self.templates = templates
        self.spec = spec
        self.before, self.after = chat_text.split(TEXT_SENTINEL)
        self.reserved = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]

    def check_instruction(self, instruction) -> str:
        if not isinstance(instruction, str):
            raise InstructionError(f"instruction must be a string, got {type(instruction).__name__}")
        if not instruction.strip():
            raise InstructionError("instruction is empty")
        for token in self.reserved:
            if token in instruction:
                raise InstructionError(f"instruction contains the reserved token {token!r}")
        return instruction

    def build(self, instruction: str, n_source: int, n_edited: int) -> list[Prompt]:
        """One prompt per head; ``n_source``/``n_edited`` are the images' merged token counts."""
        instruction = self.check_instruction(instruction)
        start, middle, end = self.before.split(IMAGE_PAD)
        head = start + IMAGE_PAD * n_source + middle + IMAGE_PAD * n_edited + end
        prompts = []
        for k in range(len(self.templates.rubrics)):
            text = head + self.templates.rubric_text(k, instruction) + self.after
            ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)
            reward = np.flatnonzero(ids == self.spec.tokens.reward)
            if len(reward) != 1:
                raise InstructionError(f"prompt for head {k} holds {len(reward)} <|Reward|> tokens, expected 1")
            if len(ids) > self.spec.max_prompt_tokens:
                raise PromptTooLongError(
                    f"prompt for head {k} is {len(ids)} tokens, over the limit of {self.spec.max_prompt_tokens}"
                )
            prompts.append(Prompt(ids, int(reward[0])))
        return prompts
