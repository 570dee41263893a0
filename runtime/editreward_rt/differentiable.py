"""A differentiable EditReward, for reward-gradient training (ReFL / DRaFT): gradients of the reward
flow back to the edited image (and to the source, if it asks for them).

    reward = DifferentiableReward.load("TIGER-Lab/EditReward", device="cuda", dtype="bfloat16")
    mu_log_sigma = reward(instructions, source, edited)   # [B, 2]; images [B, 3, H, W] in [0, 1]
    (-mu_log_sigma[:, 0]).mean().backward()

It runs the fast path on the torch modules: each image through the vision tower once, the prefix
the two rubric passes share decoded once, nothing after <|Reward|>, the heads in float32. The one
deliberate difference from the reference is the resize, bilinear (``F.interpolate``, which has a
gradient) where the reference uses PIL's bicubic; at the target size nothing is resized and the
result equals ``Scorer.score`` on the same pixels. torch is imported when a model is loaded.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ImageError, InputError
from .extras import require
from .families import family_for
from .pipeline import common_prefix


class DifferentiableReward:
    def __init__(self, scorer, gradient_checkpointing: bool = False, freeze_source: bool = False,
                 resize: str = "bilinear"):
        if resize not in ("bilinear", "bicubic"):
            raise InputError(f"resize must be 'bilinear' (upstream's differentiable path) or 'bicubic', not {resize!r}")
        self.resize = resize
        self.torch = require("torch", "torch", "the differentiable reward")
        self.scorer, self.spec = scorer, scorer.spec
        self.family = family_for(self.spec)
        graphs = scorer.backend.graphs
        self.vision, self.decoder, self.heads = graphs.vision_module, graphs.decoder, graphs.head_module
        self.device, self.dtype, self.cache = graphs.device, graphs.dtype, graphs.cache
        self.freeze_source = freeze_source
        for module in (self.vision, self.decoder):
            module.checkpointing = gradient_checkpointing

    @classmethod
    def load(cls, checkpoint_or_folder: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
             base: str | None = None, prompts_from: str | os.PathLike | None = None,
             gradient_checkpointing: bool = False, freeze_source: bool = False,
             resize: str = "bilinear") -> "DifferentiableReward":
        """A checkpoint (hub id or folder) or a torch-quantized model folder (bnb-int8, bnb-nf4,
        gptq-int4: their layers pass gradients to their inputs; such a folder runs in the compute dtype
        it was quantized for, and ``dtype`` is not used). ``dtype`` float64 runs everything, heads
        included, in float64 (for gradient checks); otherwise the heads stay float32. ``resize``: "bilinear"
        (upstream's differentiable path) or "bicubic" (antialiased; nearer the reference's PIL bicubic)."""
        from .scorer import Scorer

        scorer = Scorer.load(checkpoint_or_folder, backend="torch", mode="fast", base=base, prompts_from=prompts_from,
                             device=device, dtype=dtype)
        if str(scorer.backend.graphs.dtype) == "torch.float64":
            scorer.backend.graphs.head_module.double()
        return cls(scorer, gradient_checkpointing, freeze_source, resize)

    # ------------------------------------------------------------ inputs

    def _check(self, name: str, images, batch: int):
        """Typed errors for what is not [batch, 3, H, W] RGB in [0, 1]; the images on the model's device and dtype."""
        torch = self.torch
        if not isinstance(images, torch.Tensor):
            raise ImageError(f"{name} must be a torch tensor [B, 3, H, W], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != batch:
            raise ImageError(f"{name} must be [B={batch}, 3, H, W] RGB, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ImageError(f"{name} must be a float tensor in [0, 1], got {images.dtype}")
        if images.numel() == 0:
            raise ImageError(f"{name} is empty: {tuple(images.shape)}")
        with torch.no_grad():
            if not torch.isfinite(images).all():
                raise ImageError(f"{name} holds NaN or infinite values")
            low, high = float(images.min()), float(images.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ImageError(f"{name} must be RGB in [0, 1]; its values span [{low:.4g}, {high:.4g}]")
        return images.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------ forward

    def _embed(self, image):
        """[3, H, W] -> merged image embeddings [n, hidden] in processor order, and n."""
        feeds, order, n = self.family.torch_image_feeds(image, self.resize)
        return self.vision(*feeds)[order], n

    def _decode(self, ids, rows, start: int, table, past):
        """One padded batch of segments continuing ``past`` (rows of -1: text tokens)."""
        torch = self.torch
        b, s = len(ids), max(len(i) for i in ids)
        tokens = torch.full((b, s), self.spec.tokens.pad, dtype=torch.long, device=self.device)
        index = torch.full((b, s), -1, dtype=torch.long, device=self.device)
        mask = torch.zeros((b, start + s), dtype=torch.long, device=self.device)
        mask[:, :start] = 1
        for k, (seg, seg_rows) in enumerate(zip(ids, rows)):
            tokens[k, : len(seg)] = torch.as_tensor(seg, device=self.device)
            index[k, : len(seg)] = torch.as_tensor(seg_rows, device=self.device)
            mask[k, start : start + len(seg)] = 1
        positions = (start + torch.arange(s, device=self.device)).expand(b, s)
        return self.decoder(tokens, table, index, positions, mask, past)

    def _source(self, source, seen: list):
        """The source's embeddings, computed once per distinct source image of the call when the
        source takes no gradient (a GRPO group's edits share one source)."""
        torch = self.torch
        tracked = torch.is_grad_enabled() and source.requires_grad and not self.freeze_source
        if not tracked:
            for image, embedded in seen:
                if image.shape == source.shape and torch.equal(image, source):
                    return embedded
        with torch.set_grad_enabled(tracked):
            embedded = self._embed(source)
        if not tracked:
            seen.append((source, embedded))
        return embedded

    def _one(self, instruction: str, source, edited, seen: list):
        torch = self.torch
        src, n_src = self._source(source, seen)
        edit, n_edit = self._embed(edited)
        table = torch.cat([src, edit])
        prompts = self.scorer.builder.build(instruction, n_src, n_edit)
        seqs = [(p.scored_ids, p.image_rows(0, n_src)) for p in prompts]
        shared = min(common_prefix(seqs[0][0], ids) for ids, _ in seqs[1:]) if len(seqs) > 1 else len(seqs[0][0]) - 1
        shared = min(shared, min(len(ids) for ids, _ in seqs) - 1)  # every pass keeps at least its reward token
        empty = torch.zeros(self.cache.shape(1), dtype=self.dtype, device=self.device)
        ids, rows = seqs[0]
        _, present = self._decode([ids[:shared]], [rows[:shared]], 0, table, empty)
        past = present.expand(self.cache.shape(len(seqs), present.shape[self.cache.length_axis]))
        hidden, _ = self._decode([i[shared:] for i, _ in seqs], [r[shared:] for _, r in seqs], shared, table, past)
        last = torch.as_tensor([len(i) - shared - 1 for i, _ in seqs], device=self.device)
        at_reward = hidden[torch.arange(len(seqs), device=self.device), last]  # [K, H]
        return self.heads(at_reward[None])[0]  # [K, 2]

    def head_outputs(self, instructions: list[str], source, edited):
        """Per-head (mu, log_sigma) [B, K, 2]."""
        torch = self.torch
        if isinstance(instructions, str) or not hasattr(instructions, "__len__") or not len(instructions):
            raise InputError("instructions must be a non-empty list of strings, one per image pair")
        source = self._check("source", source, len(instructions))
        edited = self._check("edited", edited, len(instructions))
        seen: list = []
        return torch.stack([self._one(instructions[b], source[b], edited[b], seen) for b in range(len(instructions))])

    def __call__(self, instructions: list[str], source, edited):
        """[B, 2]: the fused (mu, log_sigma) of each triple, as the reference's mean pooling."""
        if self.spec.heads.fusion != "mean":
            raise InputError(f"the differentiable reward fuses heads by mean; this model uses {self.spec.heads.fusion!r}")
        return self.head_outputs(instructions, source, edited).mean(dim=1)


def backward_memory_estimate_gib(spec, batch: int, bytes_per_value: int = 2, tokens: int = 1300, patches: int = 1024,
                                 checkpointing: bool = True) -> dict:
    """A budget for one backward pass at ``batch`` triples: the weights, what the forward keeps for
    the backward (with gradient checkpointing: each decoder layer's and vision block's input; without:
    about 12 values per hidden unit per layer), and one layer's working set when it is recomputed
    (its activations and attention scores). ``tokens``: decoded positions per triple (both rubric
    passes, the prefix once); ``patches``: per image."""
    t, v = spec.text, spec.vision
    weights = sum(int(np.prod(shape)) for shape in family_for(spec).expected_shapes().values()) * bytes_per_value
    per_layer = 1 if checkpointing else 12
    kept = batch * (t.num_layers * tokens * t.hidden_size * per_layer + 2 * v.depth * patches * v.hidden_size * per_layer)
    working = batch * (tokens * (6 * t.hidden_size + 3 * t.intermediate_size) + t.num_heads * tokens * tokens)
    parts = {"weights": weights, "kept_activations": kept * bytes_per_value, "layer_working_set": working * bytes_per_value}
    return {k: round(val / 2**30, 2) for k, val in {**parts, "total": sum(parts.values())}.items()}