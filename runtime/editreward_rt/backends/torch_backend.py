"""PyTorch backend: ``reference`` (two full transformers passes per triple, as upstream) and
``fast`` (this project's modules on the shared fast path). Needs the ``torch`` extra."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..pipeline import FastPipeline, PreparedTriple
from ..spec import ModelSpec


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendError("the torch backend needs PyTorch: pip install 'editreward-deploy[torch]'") from exc
    return torch


def pick_device(device: str):
    torch = _torch()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but PyTorch sees no CUDA GPU")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BackendError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def pick_dtype(dtype: str | None, device) :
    torch = _torch()
    name = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    try:
        return getattr(torch, name)
    except AttributeError as exc:
        raise BackendError(f"unknown dtype {name!r}") from exc


class TorchEngine:
    """The fast-path primitives on this project's torch modules (also what ONNX export traces)."""

    def __init__(self, spec: ModelSpec, state: dict | None, device, dtype):
        from ..modeling import build_modules

        torch = _torch()
        self.torch, self.spec, self.device, self.dtype = torch, spec, device, dtype
        with torch.device(device):  # initialise on the target device: a 7B model's CPU init takes minutes
            modules = build_modules(spec, state, dtype)
        self.vision_module, self.decoder, self.head_module = (m.to(device) for m in modules)

    @classmethod
    def empty(cls, spec: ModelSpec, device, dtype) -> "TorchEngine":
        """Modules with uninitialised weights, to be filled from a quantized state."""
        return cls(spec, None, device, dtype)

    def _t(self, array, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(array), device=self.device, dtype=dtype)

    def vision(self, patches, cos, sin, window_segments, image_segments):
        with self.torch.inference_mode():
            out = self.vision_module(self._t(patches, self.dtype), self._t(cos), self._t(sin),
                                     self._t(window_segments), self._t(image_segments))
        return out.float().cpu().numpy()

    def decode(self, input_ids, image_embeds, image_index, position_ids, attention_mask, past):
        with self.torch.inference_mode():
            hidden, present = self.decoder(self._t(input_ids), self._t(image_embeds, self.dtype), self._t(image_index),
                                           self._t(position_ids), self._t(attention_mask), past)
        return hidden.float().cpu().numpy(), present

    def heads(self, hidden):
        with self.torch.inference_mode():
            return self.head_module(self._t(hidden, self.torch.float32)).cpu().numpy()

    def empty_cache(self, batch: int = 1):
        t = self.spec.text
        return self.torch.zeros((t.num_layers, 2, batch, t.num_kv_heads, 0, t.head_dim), dtype=self.dtype, device=self.device)

    def select(self, cache, rows):
        return cache[:, :, self._t(rows)]


class ReferenceRunner:
    """Upstream's computation: per head, one full pass of transformers' Qwen2.5-VL over the whole
    prompt (vision tower included), with the plain 1-D positions upstream's call produces."""

    def __init__(self, spec: ModelSpec, config: dict, state: dict, device, dtype):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        from ..modeling import RewardHeads, split_state_dict

        torch = _torch()
        self.torch, self.spec, self.device, self.dtype = torch, spec, device, dtype
        hf_config = Qwen2_5_VLConfig.from_dict(config)
        hf_config.text_config.vocab_size = spec.text.vocab_size
        hf_config.vocab_size = spec.text.vocab_size
        with torch.device(device):
            self.model = Qwen2_5_VLModel._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
        body = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(body, strict=True)
        self.model.to(device=device, dtype=dtype).eval()
        self.heads = RewardHeads(spec.heads)
        self.heads.load_state_dict(split_state_dict(state)["heads"], strict=True)
        self.heads.to(device).float().eval()

    def _image_embeds(self, pixel_values, grid):
        out = self.model.visual(pixel_values, grid_thw=grid)
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output

    def run(self, triples: list[PreparedTriple]) -> np.ndarray:
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


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint, mode: str = "fast", device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None):
        torch = _torch()
        if threads:
            torch.set_num_threads(threads)
        if mode not in ("fast", "reference"):
            raise BackendError(f"unknown mode {mode!r}; use fast or reference")
        self.spec, self.mode = checkpoint.spec, mode
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        state = checkpoint.state_dict()
        if mode == "reference":
            self.runner = ReferenceRunner(self.spec, checkpoint.config, state, dev, dt)
            self.pipeline = None
        else:
            self.engine = TorchEngine(self.spec, state, dev, dt)
            self.pipeline = FastPipeline(self.engine)
        self.description = {"backend": "torch", "mode": mode, "device": str(dev), "dtype": str(dt).replace("torch.", "")}

    @classmethod
    def from_quantized(cls, model, mode: str = "fast", device: str = "cpu", threads: int | None = None):
        """A bitsandbytes- or GPTQ-quantized model folder written by ``quantize/quantize.py``."""
        from ..quantized_embedding import swap_empty_embedding
        from ..quantized_gptq import GPTQ_SCHEMES
        from ..quantized_torch import BNB_SCHEMES, load_quantized_state, swap_linears

        torch = _torch()
        quant = model.manifest.get("quantization") or {}
        if quant.get("scheme") not in BNB_SCHEMES + GPTQ_SCHEMES:
            raise BackendError(f"{model.root} is not a torch-quantized model folder (scheme {quant.get('scheme')!r})")
        if mode != "fast":
            raise BackendError("a quantized model runs in fast mode; the reference is the float checkpoint")
        if threads:
            torch.set_num_threads(threads)
        self = cls.__new__(cls)
        self.model, self.spec, self.mode, self.runner = model, model.spec, mode, None
        dev = pick_device(device)
        dt = getattr(torch, model.manifest.get("compute_dtype", "float32"))
        self.engine = TorchEngine.empty(self.spec, dev, dt)
        modules = {"vision": self.engine.vision_module, "decoder": self.engine.decoder, "heads": self.engine.head_module}
        from safetensors.torch import load_file

        state = load_file(str(model.root / model.manifest["weights"]))
        swap_empty_embedding(modules["decoder"], quant.get("embedding"), dt)
        if quant["scheme"] in GPTQ_SCHEMES:
            from ..quantized_gptq import load_gptq_modules

            load_gptq_modules(modules, quant, state, dev)
        else:
            swap_linears(modules, quant, dev, load_float=False)
            load_quantized_state(modules, quant, state, dev)
        self.pipeline = FastPipeline(self.engine)
        self.description = {"backend": "torch", "mode": mode, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
                            "quantization": quant["scheme"]}
        return self

    def head_outputs(self, triples: list[PreparedTriple]) -> np.ndarray:
        if self.pipeline is None:
            return self.runner.run(triples)
        return self.pipeline.run(triples)
