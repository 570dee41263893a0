"""The reference computation: upstream's, on transformers' own Qwen2.5-VL model.

Per head, one full pass of ``Qwen2_5_VLModel`` over the whole prompt (vision tower included),
called with ``inputs_embeds``, ``attention_mask`` and the plain 1-D positions upstream's call
produces (``attention_mask.cumsum(-1) - 1`` on all three M-RoPE sections), heads in float32.
"""

from __future__ import annotations

import numpy as np
from editreward_rt.errors import BackendError
from editreward_rt.extras import require

from .modeling import RewardHeads
from .spec import ModelSpec
from .weights import split_state_dict

# ``_from_config(dtype=)`` (4.56) and a flat Qwen2.5-VL config split into text and vision parts by
# ``from_dict`` (4.52); tested on 5.17 (the GPU image's) and 5.24. Where ``visual`` returns a model
# output (>= 5) its ``pooler_output`` holds the merged embeddings; before, the tensor itself.
MIN_TRANSFORMERS = (4, 57)


def check_transformers(version: str) -> None:
    """Raise BackendError naming the release the reference needs when ``version`` is older."""
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if found < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise BackendError(f"the PyTorch reference needs transformers >= {need}, found {version}: pip install 'transformers>={need}'")


def hf_model(spec: ModelSpec, config: dict, dtype):
    """transformers' ``Qwen2_5_VLModel`` for ``config`` (the checkpoint's config dict, flat or nested)
    in ``dtype``, on torch's current default device (``torch.device("meta")``: shapes only, no memory)."""
    transformers = require("transformers", "torch", "the PyTorch reference")
    check_transformers(transformers.__version__)
    hf_config = transformers.Qwen2_5_VLConfig.from_dict(config)
    hf_config.text_config.vocab_size = spec.text.vocab_size
    hf_config.vocab_size = spec.text.vocab_size
    return transformers.Qwen2_5_VLModel._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)


class ReferenceRunner:
    """Upstream's computation: per head, one full pass of transformers' Qwen2.5-VL over the whole
    prompt (vision tower included), with the plain 1-D positions upstream's call produces."""

    def __init__(self, spec: ModelSpec, config: dict, state: dict, device, dtype):
        import torch

        self.torch, self.spec, self.device, self.dtype = torch, spec, device, dtype
        with torch.device(device):
            self.model = hf_model(spec, config, dtype)
        body = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(body, strict=True)
        self.model.to(device=device, dtype=dtype).eval()
        self.heads = RewardHeads(spec.heads)
        self.heads.load_state_dict(split_state_dict(state)["heads"], strict=True)
        self.heads.to(device).float().eval()

    def _image_embeds(self, pixel_values, grid):
        out = self.model.visual(pixel_values, grid_thw=grid)
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output

    def run(self, triples: list) -> np.ndarray:
        """PreparedTriples -> per-head outputs [T, K, 2]."""
        torch = self.torch
        images = [im for t in triples for im in (t.source, t.edited)]
        pixel_values = torch.as_tensor(np.concatenate([im.pixel_values for im in images]), device=self.device, dtype=self.dtype)
        grid = torch.as_tensor([im.grid_thw for im in images], device=self.device)
        outputs = []
        with torch.inference_mode():
            for k in range(self.spec.heads.num_heads):
                seqs = [t.prompts[k].ids for t in triples]
                length = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), length), self.spec.tokens.pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), length), dtype=torch.long)
                for i, s in enumerate(seqs):  # right padding, as upstream's processor
                    ids[i, : len(s)], mask[i, : len(s)] = torch.as_tensor(s), 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                embeds = self.model.language_model.embed_tokens(ids)
                image_embeds = self._image_embeds(pixel_values, grid).to(embeds.dtype)
                image_mask = (ids == self.spec.tokens.image_pad).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(image_mask, image_embeds)
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                hidden = self.model.language_model(
                    inputs_embeds=embeds, attention_mask=mask, position_ids=positions.unsqueeze(0).expand(3, -1, -1)
                ).last_hidden_state
                per_position = self.heads.heads[f"head_{k}"](hidden.float())  # [B, L, 2]
                outputs.append(per_position[ids == self.spec.tokens.reward].view(len(seqs), -1))
        return torch.stack(outputs, dim=1).cpu().numpy()
