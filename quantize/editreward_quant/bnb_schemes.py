"""bitsandbytes schemes: a checkpoint -> a pre-quantized torch model folder the torch backend loads."""

from __future__ import annotations

from pathlib import Path

from editreward_rt.checkpoint import open_checkpoint
from editreward_rt.schemes import BnbInt8, BnbNf4, QuantizeRequest, Scheme

from .embedding import quantize_torch_embedding
from .output import write_torch_model


def quantize_checkpoint_bnb(ckpt_arg: str, scheme: Scheme, out: Path, base: str | None = None,
                            prompts_from: str | None = None, device: str = "cpu", log=print) -> Path:
    import torch
    from editreward_rt.backends.torch_backend import TorchGraphs, pick_device

    assert isinstance(scheme, (BnbInt8, BnbNf4))
    ckpt = open_checkpoint(ckpt_arg, base=base, prompts_from=prompts_from)
    source = {"checkpoint": ckpt.origin["checkpoint"], "files": sorted(p.name for p in ckpt.files)}
    dev = pick_device(device)
    # Non-quantized parts run in bf16 on a GPU, float32 on a CPU (no fast bf16 there for every op).
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    log(f"loading {ckpt_arg}")
    graphs = TorchGraphs(ckpt.spec, ckpt.state_dict(), dev, dtype)
    quant = {**scheme.to_dict(), "embedding": _quantize_graphs(graphs, scheme, log)}
    write_torch_model(out, source, ckpt, _modules(graphs), dtype, quant)
    log(f"wrote {out}")
    return out


def _modules(graphs) -> dict:
    return {"vision": graphs.vision_module, "decoder": graphs.decoder, "heads": graphs.head_module}


def _quantize_graphs(graphs, scheme: Scheme, log) -> dict:
    """Swap the linear layers of ``graphs`` for bitsandbytes ones and quantize the token embedding, in
    place; -> the embedding's record."""
    from .layers.bnb import swap_linears

    log(f"quantizing decoder linear layers with {scheme.name}" + (" and the vision tower" if scheme.include_vision else ""))
    swap_linears(_modules(graphs), scheme, graphs.device, load_float=True)
    return quantize_torch_embedding(graphs.decoder, scheme.embedding_bits, scheme.embedding_block)


def quantize_backend(backend, ckpt, scheme: Scheme, triples, log=print) -> dict:
    """Registry ``quantize_backend`` of ``bnb-int8`` and ``bnb-nf4``: a loaded torch backend quantized in
    place (bitsandbytes needs no calibration: ``ckpt`` and ``triples`` go unread)."""
    return {"embedding": _quantize_graphs(backend.graphs, scheme, log)}


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of ``bnb-int8`` and ``bnb-nf4``."""
    return quantize_checkpoint_bnb(request.source, request.scheme, Path(request.out), base=request.base,
                                   prompts_from=request.prompts_from, device=request.device)
