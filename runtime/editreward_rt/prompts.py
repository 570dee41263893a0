"""Tokenizer, chat-template and prompt pieces every model family shares, with the
``tokenizers`` library alone (jinja2 only to render a chat template, at load or export time).

A family renders its base chat template once for one user message [image, image, text],
with ``TEXT_SENTINEL`` where the text goes; its prompt builder then formats the rubric,
expands the image placeholders and tokenizes (``editreward_families.<name>.chat``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from .errors import CheckpointError, InstructionError, PromptTooLongError
from .extras import require

TEXT_SENTINEL = "\u0000EDITREWARD_TEXT\u0000"
REWARD_TOKEN = "<|Reward|>"


# Bounds on rendering a chat template (a model file, so untrusted). It renders in a child process
# with a memory cap and a time limit, which bound whatever the template does, C-level string
# methods included; inside, traced steps (a real template takes a few thousand) and the size of
# values built by operators are bounded too, so the usual refusals come with a reason.
TEMPLATE_STEPS = 1_000_000
TEMPLATE_SIZE = 1_000_000
TEMPLATE_SECONDS = 20.0
TEMPLATE_MEMORY = 1 << 30  # bytes of address space for the rendering process


def render_messages(template: str, messages: list[dict]) -> str:
    """Render a chat template for ``messages`` with the generation prompt, in jinja's immutable
    sandbox, in a child process with bounded memory and time: any failure, a template that loops
    too long or builds too much included, is a ``CheckpointError`` instead of holding the load."""
    import subprocess
    import sys

    require("jinja2", "torch", "rendering a base model's chat template")
    payload = json.dumps({"template": template, "messages": messages})
    try:
        done = subprocess.run([sys.executable, "-c", "from editreward_rt.prompts import _render_child; _render_child()"],
                              input=payload, capture_output=True, text=True, timeout=TEMPLATE_SECONDS,
                              preexec_fn=_limit_memory, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"the chat template takes more than {TEMPLATE_SECONDS:g} s to render: refused as unbounded") from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        killed = "memory" if done.returncode != 0 else "output"
        raise CheckpointError(f"the chat template could not be rendered within its {killed} bounds "
                              f"(exit {done.returncode}): {done.stderr.strip()[-200:]}") from None
    if "error" in answer:
        raise CheckpointError(f"the chat template {answer['error']}")
    return answer["rendered"]


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (TEMPLATE_MEMORY, TEMPLATE_MEMORY))


def _render_child() -> None:
    """The rendering process: stdin {template, messages} -> stdout {rendered} or {error}."""
    import sys

    request = json.loads(sys.stdin.read())
    try:
        print(json.dumps({"rendered": _render_bounded(request["template"], request["messages"])}))
    except CheckpointError as exc:
        print(json.dumps({"error": str(exc)}))
    except Exception as exc:  # whatever the template raises (ZeroDivisionError, RecursionError, ...)
        print(json.dumps({"error": f"fails to render: {type(exc).__name__}: {str(exc)[:200]}"}))


def _render_bounded(template: str, messages: list[dict]) -> str:
    import sys

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            # Refuse before computing what would be too large: a repeated sequence, a huge power.
            sized = [len(x) for x in (left, right) if hasattr(x, "__len__")]
            counts = [x for x in (left, right) if isinstance(x, int)]
            if operator == "*" and sized and counts and sized[0] * max(counts[0], 0) > TEMPLATE_SIZE:
                raise CheckpointError(f"builds a value of {sized[0] * counts[0]} items (limit {TEMPLATE_SIZE})")
            if operator == "**" and isinstance(right, int) and right > 64:
                raise CheckpointError("computes a power beyond 64")
            result = super().call_binop(context, operator, left, right)
            if hasattr(result, "__len__") and len(result) > TEMPLATE_SIZE:
                raise CheckpointError(f"builds a value of {len(result)} items (limit {TEMPLATE_SIZE})")
            if isinstance(result, int) and result.bit_length() > 64:
                raise CheckpointError("computes an integer beyond 64 bits")
            return result

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, **kw)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"does not parse: {exc}") from None
    steps = [0]

    def tracer(frame, event, arg):  # counts every line the rendering runs, nested calls included
        steps[0] += 1
        if steps[0] > TEMPLATE_STEPS:
            raise CheckpointError(f"runs more than {TEMPLATE_STEPS} steps: refused as unbounded")
        return tracer

    sys.settrace(tracer)
    try:
        rendered = compiled.render(messages=messages, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"fails to render: {exc}") from None
    finally:
        sys.settrace(None)
    if len(rendered) > TEMPLATE_SIZE:
        raise CheckpointError(f"renders {len(rendered)} characters (limit {TEMPLATE_SIZE})")
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
    images: tuple[tuple[int, int], ...]  # (first position, token count) of each image: source, then edited

    @property
    def scored_ids(self) -> np.ndarray:
        return self.ids[: self.reward_pos + 1]

    def image_rows(self, *offsets: int) -> np.ndarray:
        """Each scored position's row in an image-embedding table whose image ``i`` starts at row
        ``offsets[i]``, or -1 for text: [reward_pos + 1] int64."""
        rows = np.full(self.reward_pos + 1, -1, dtype=np.int64)
        for (start, count), offset in zip(self.images, offsets, strict=True):
            rows[start : start + count] = offset + np.arange(count)
        return rows


# NFC, the normaliser of Qwen-style tokenizers, composes at most 4 code points into one character
# (the longest canonical decomposition); so an instruction shrinks at most 4-fold before tokenizing.
NFC_MAX_COMPOSED = 4


def max_instruction_chars(tokenizer: Tokenizer, max_prompt_tokens: int) -> int:
    """Characters beyond which an instruction cannot fit ``max_prompt_tokens`` tokens, whatever it
    holds: a token covers at most its own length in normalised characters (a byte-level token's
    string has one character per byte, and a character is at least one byte). A longer one is
    refused by its length alone, before tokenizing it costs time and memory in proportion."""
    longest = max(len(token) for token in tokenizer.get_vocab(with_added_tokens=True))
    return max_prompt_tokens * longest * NFC_MAX_COMPOSED


def check_instruction(instruction, reserved: list[str], max_chars: int | None = None) -> str:
    """The instruction as given, or an ``InstructionError``: not a string, empty, or holding a reserved
    token; or a ``PromptTooLongError``: over ``max_chars`` characters (checked first, so the other
    checks never scan a huge string)."""
    if not isinstance(instruction, str):
        raise InstructionError(f"instruction must be a string, got {type(instruction).__name__}")
    if max_chars is not None and len(instruction) > max_chars:
        raise PromptTooLongError(f"instruction is {len(instruction)} characters, over the limit of {max_chars} "
                                 "(no instruction that long fits the model's maximum prompt tokens)")
    if not instruction.strip():
        raise InstructionError("instruction is empty")
    try:
        instruction.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not text any tokenizer can take
        raise InstructionError(f"instruction is not valid Unicode text ({exc.reason} at {exc.start})") from None
    for token in reserved:
        if token in instruction:
            raise InstructionError(f"instruction contains the reserved token {token!r}")
    return instruction


def reserved_tokens(tokenizer: Tokenizer) -> list[str]:
    return [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
