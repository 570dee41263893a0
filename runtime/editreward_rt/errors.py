"""Typed errors. Every failure a user can cause maps to one of these classes.

Each carries a short machine-readable ``kind`` (used as ``error.type`` in JSONL
output) and a message that names the offending file, field or limit.
"""

from __future__ import annotations


class EditRewardError(Exception):
    """Base class of every error raised on purpose by this project."""

    kind = "error"

    def to_dict(self) -> dict:
        return {"type": self.kind, "message": str(self)}


class InputError(EditRewardError, ValueError):
    """A triple, or part of one, cannot be scored."""

    kind = "input_error"


class ImageError(InputError):
    """An image is missing, empty, truncated, corrupt or in a format PIL cannot read."""

    kind = "image_error"


class ImageTooLargeError(ImageError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""

    kind = "image_too_large"


class AspectRatioError(ImageError):
    """An image is more than 200 times wider than tall, or the reverse."""

    kind = "aspect_ratio"


class InstructionError(InputError):
    """The instruction is empty, not a string, or holds a reserved special token."""

    kind = "instruction_error"


class PromptTooLongError(InputError):
    """The assembled prompt is longer than the configured or exported maximum."""

    kind = "prompt_too_long"


class CheckpointError(EditRewardError):
    """A checkpoint or exported model folder cannot be resolved or read."""

    kind = "checkpoint_error"


class ArchitectureError(CheckpointError):
    """The checkpoint names an architecture or head layout this project does not implement."""

    kind = "architecture_error"


class WeightMismatchError(CheckpointError):
    """Checkpoint tensors are missing, unexpected or of the wrong shape."""

    kind = "weight_mismatch"


class ManifestError(CheckpointError):
    """An exported model folder's manifest is missing, of an unknown version, or its files fail their hash."""

    kind = "manifest_error"


class OutputError(EditRewardError):
    """A results file cannot be written (a full disk, a lost mount); what was written before stays."""

    kind = "output_error"


class TemplateError(EditRewardError):
    """Prompt templates cannot be found, verified or extracted."""

    kind = "template_error"


class BackendError(EditRewardError):
    """An unknown backend, a backend whose library is missing, or a device that is not there."""

    kind = "backend_error"


class ExportError(EditRewardError):
    """An export or its self-validation failed."""

    kind = "export_error"


class OverloadedError(EditRewardError):
    """A bounded queue is full (back-pressure): nothing was accepted; retry later."""

    kind = "overloaded"


class NotReadyError(EditRewardError):
    """The scorer or service is closed, shutting down or not started: nothing was accepted."""

    kind = "not_ready"


class DeadlineError(EditRewardError):
    """The triple's deadline passed before it was scored; it was dropped, not scored."""

    kind = "timeout"


def error_classes() -> dict[str, type[EditRewardError]]:
    """Every error class defined here, by ``kind`` (what a client turns an error body back into)."""
    out, todo = {}, [EditRewardError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:
            out.setdefault(cls.kind, cls)
        todo.extend(cls.__subclasses__())
    return out
