"""GPTQ 4-bit (scheme ``gptq-int4``): a checkpoint -> a pre-quantized torch model folder.

GPTQModel's layer-level GPTQ (its ``GPTQ`` class: Hessian accumulation and the column-by-column
error-compensating quantization) runs on the decoder's linear layers, one decoder layer at a
time, with calibration activations captured from this project's own torch ``Decoder`` while the
fast pipeline scores calibration triples. Those activations therefore come from the scoring
path itself: the same image preprocessing, the real prompts, plain 1-D positions and the
pipeline's prefix sharing. Padding positions are left out of the Hessians.

Order, as GPTQ's "true sequential" mode: within decoder layer ``i`` the linears are quantized
in four groups (q/k/v, o, gate/up, down); each group is calibrated by a pass in which every
earlier group and layer already runs quantized, so later layers see the errors of earlier ones.
Layer ``i``'s passes run that layer alone, fed with the inputs recorded (in host memory: one
hidden state per calibration token) when layer ``i - 1`` was done; the vision tower runs once
per image for the whole job. Cost: about 5 decoder-layer passes over the calibration set per layer.

Each quantized linear is packed at once into GPTQModel's ``TorchLinear`` (see
``editreward_quant.layers.gptq``), so later passes run the runtime's exact arithmetic. The
token embedding is rounded to 8 bits (``embedding_bits``; a lookup has no activations for GPTQ
to use) before calibration starts; the vision tower, norms and float32 reward heads keep their precision.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from editreward_rt.checkpoint import open_checkpoint
from editreward_rt.schemes import GptqInt4, QuantizeError, QuantizeRequest

from .calib import calibration_triples, prepare_all
from .embedding import quantize_torch_embedding
from .output import write_torch_model


def quantize_checkpoint_gptq(ckpt_arg: str, scheme: GptqInt4, out: Path, base: str | None = None,
                             prompts_from: str | None = None, calib: str | None = None, calib_size: int = 64,
                             device: str = "cpu", log=print) -> Path:
    from editreward_rt.backends.torch_backend import TorchBackend

    from .layers.gptq import KERNEL, LAYOUT

    assert isinstance(scheme, GptqInt4)
    ckpt = open_checkpoint(ckpt_arg, base=base, prompts_from=prompts_from)
    source = {"checkpoint": ckpt.origin["checkpoint"], "files": sorted(p.name for p in ckpt.files)}
    # Non-quantized parts (and the calibration passes) run in bf16 on a GPU, float32 on a CPU.
    log(f"loading {ckpt_arg}")
    backend = TorchBackend(ckpt, mode="fast", device=device)
    graphs = backend.graphs
    info = quantize_backend(backend, ckpt, scheme, calibration_triples(calib, calib_size), log)

    modules = {"vision": graphs.vision_module, "decoder": graphs.decoder, "heads": graphs.head_module}
    quantization = {**scheme.to_dict(),
                    "kernel": {"name": KERNEL, "layout": LAYOUT, "bits": 4, "gptqmodel": version("gptqmodel")},
                    "calibration": {"triples": str(calib) if calib else f"synthetic:{calib_size}", **info["calibration"]},
                    "mean_layer_loss": info["mean_layer_loss"], "embedding": info["embedding"]}
    write_torch_model(out, source, ckpt, modules, graphs.dtype, quantization)
    log(f"wrote {out}")
    return out


def quantize_backend(backend, ckpt, scheme: GptqInt4, triples, log=print) -> dict:
    """GPTQ the decoder of a loaded fast-mode torch ``backend`` in place, calibrated on ``triples``
    through a Scorer of ``ckpt`` (its preprocessing and prompts). Used by the CLI above and, as the
    registry's ``quantize_backend``, without any file round trip by the GPU matrix check."""
    from editreward_rt.scorer import Scorer

    graphs, scorer = backend.graphs, Scorer(backend, ckpt)
    # First, so that calibration sees the embedding the folder will hold.
    embedding = quantize_torch_embedding(graphs.decoder, scheme.embedding_bits, scheme.embedding_block)
    prepared = prepare_all(scorer, triples)
    log(f"calibrating on {len(prepared)} triples, {len(graphs.decoder.layers)} decoder layers")
    gptq = _GptqRun(graphs, backend.pipeline, prepared, scheme, scorer.max_batch, log)
    with torch.inference_mode():
        losses = gptq.run()
    return {"calibration": {"count": len(prepared), "tokens": gptq.tokens}, "embedding": embedding,
            "mean_layer_loss": float(np.mean(losses)) if losses else None}


class _GptqRun:
    """Layer-by-layer GPTQ over calibration passes of the fast pipeline.

    A pass for decoder layer ``i`` runs the decoder with every other layer replaced by ``_Skip``
    (which only keeps the key/value cache shapes) and feeds layer ``i``, call by call, the input
    recorded when layer ``i-1`` was done; its own key/value cache is computed in the pass, level
    after level, as in scoring. The pipeline makes the same decoder calls in the same order on
    every pass, so call ``c`` of one pass matches call ``c`` of the next."""

    def __init__(self, graphs, pipeline, prepared, scheme: GptqInt4, batch: int, log):
        self.graphs, self.pipeline, self.prepared = graphs, pipeline, prepared
        self.scheme, self.batch, self.log = scheme, batch, log
        self.valid = None  # [B*S] bool: the positions of the current decoder call that hold tokens
        self.call = 0  # decoder calls so far in this pass
        self.inputs: list = []  # per decoder call: the input of the layer being quantized (layer 1 on)
        self.tokens = 0

    def run(self) -> list[float]:
        from .layers.gptq import quant_linear_class

        quant_linear_class()  # a clear error before any work when GPTQModel is missing
        decoder = self.graphs.decoder
        layers = decoder.layers
        losses = []
        self.graphs.vision = _memo_vision(self.graphs)
        call_hook = decoder.register_forward_pre_hook(self._next_call)
        try:
            for i, layer in enumerate(layers):
                # Layers after i stand in too: the decoder computes its last layer only at the rows
                # the heads read, so layer i must be last only when it is the model's last.
                decoder.layers = type(layers)([_Skip() for _ in range(i)] + [layer] + [_Skip() for _ in range(i + 1, len(layers))])
                feed = layer.register_forward_pre_hook(self._feed) if i else None
                try:
                    for group in layer.linear_groups():  # the family's decoder layer names its linears
                        losses.extend(self._quantize_group(i, group))
                    if i + 1 < len(layers):  # the next layer's inputs: this layer's outputs, quantized
                        outputs = []
                        record = layer.register_forward_hook(lambda m, a, out: outputs.append(_stash(out[0])))
                        try:
                            self._pass()
                        finally:
                            record.remove()
                        self.inputs = outputs
                finally:
                    if feed is not None:
                        feed.remove()
                self.log(f"  layer {i + 1}/{len(layers)} quantized")
        finally:
            decoder.layers = layers
            call_hook.remove()
            del self.graphs.vision
            self.inputs = []
        return losses

    def _pass(self):
        self.call = 0
        for start in range(0, len(self.prepared), self.batch):
            self.pipeline.run(self.prepared[start : start + self.batch])

    def _next_call(self, module, args):
        input_ids, attention_mask = args[0], args[4]
        self.valid = (attention_mask[:, -input_ids.shape[1]:] > 0).reshape(-1)
        self.call += 1

    def _feed(self, module, args):
        x = self.inputs[self.call - 1] if self.call <= len(self.inputs) else None
        if x is None or x.shape != args[0].shape:
            raise QuantizeError(f"calibration pass changed shape at decoder call {self.call}: "
                                f"{None if x is None else tuple(x.shape)} recorded, {tuple(args[0].shape)} now")
        return (x.to(device=args[0].device, dtype=args[0].dtype),) + tuple(args[1:])

    def _quantize_group(self, index: int, group) -> list[float]:
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ

        s = self.scheme
        targets = {name: (parent, getattr(parent, name)) for parent, name in group}
        tasks, hooks = {}, []
        for name, (parent, linear) in targets.items():
            qcfg = QuantizeConfig(bits=4, group_size=s.group_size, desc_act=s.desc_act, sym=s.sym,
                                  act_group_aware=False, offload_to_disk=False)
            task = GPTQ(linear, qcfg)
            task.quantizer.configure(perchannel=True)
            tasks[name] = task
            hooks.append(linear.register_forward_hook(self._collector(task)))
        try:
            self._pass()
        finally:
            for hook in hooks:
                hook.remove()
        losses = []
        for name, task in tasks.items():
            parent, linear = targets[name]
            if task.nsamples == 0:
                raise QuantizeError(f"decoder layer {index} {name} saw no calibration tokens")
            if index == 0 and not self.tokens:  # calibration tokens, as the first linear saw them
                self.tokens = int(task.nsamples)
            q_weight, scale, zero, g_idx, _, loss, _, _ = task.quantize()
            task.free()
            setattr(parent, name, _pack(linear, q_weight, scale, zero, g_idx, self.scheme))
            if isinstance(loss, (int, float)):
                losses.append(float(loss))
        return losses

    def _collector(self, task):
        def collect(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            if self.valid is not None and self.valid.numel() == x.shape[0]:
                x = x[self.valid.to(x.device)]
            if x.shape[0]:
                task.add_batch(x, None)
        return collect


class _Skip(torch.nn.Module):
    """Stands in for an already quantized decoder layer during a later layer's pass: the input
    passes through and the key/value cache keeps its shape (zeros: only the layer being
    quantized reads its own cache, and its input is fed from the recording)."""

    def forward(self, x, cos, sin, mask, past_k, past_v, keep=None):
        """The decoder layer's signature; ``keep`` (the last layer's rows) picks those rows as it does."""
        b, heads, p, d = past_k.shape
        kv = past_k.new_zeros((b, heads, p + x.shape[1], d))
        return (x if keep is None else x[keep]), kv, kv


def _stash(x):
    """A recorded layer output, kept in host memory between passes."""
    return x.detach().to("cpu", copy=True)


def _pack(linear, q_weight, scale, zero, g_idx, scheme: GptqInt4):
    """GPTQ's result (float32 weight on the 4-bit grid, scales, zero points, g_idx) -> a packed
    TorchLinear on the linear's device, replacing ``linear`` (whose float weight is dropped)."""
    from .layers.gptq import finish, make_quant_linear

    device = linear.weight.device
    linear.to("cpu").float()
    linear.weight.data = q_weight.detach().to("cpu", torch.float32)
    layer = make_quant_linear(linear, {"group_size": scheme.group_size, "sym": scheme.sym, "desc_act": scheme.desc_act})
    layer.pack_original(linear, scale.cpu().float(), zero.cpu(), g_idx.cpu())
    return finish(layer, device)


def _memo_vision(graphs):
    """The graphs' vision call, run once per distinct image for the whole job: a call's images
    already seen come from the memo, the others are encoded (each alone) and kept."""
    vision, seen = graphs.vision, {}

    def key(arrays) -> str:
        patches, *_, window_rows, _ = arrays  # the window layout tells grids of one patch count apart
        digest = hashlib.blake2b(np.ascontiguousarray(patches).tobytes(), digest_size=16)
        digest.update(repr(np.shape(patches)).encode())
        digest.update(np.ascontiguousarray(window_rows).tobytes())
        return digest.hexdigest()

    def memo(feeds):
        keys = [key(arrays) for arrays in feeds]
        for k, arrays in zip(keys, feeds):
            if k not in seen:
                seen[k] = vision([arrays])
        parts = [seen[k] for k in keys]
        return graphs.table(parts, np.arange(sum(len(p) for p in parts)))

    return memo


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of ``gptq-int4``."""
    return quantize_checkpoint_gptq(request.source, request.scheme, Path(request.out), base=request.base,
                                    prompts_from=request.prompts_from, calib=request.calib,
                                    calib_size=request.calib_size, device=request.device)
