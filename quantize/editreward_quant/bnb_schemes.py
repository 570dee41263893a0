"""bitsandbytes schemes: a checkpoint -> a pre-quantized torch model folder the torch backend loads."""

from __future__ import annotations

from pathlib import Path

from editreward_rt.checkpoint import open_checkpoint
from editreward_rt.schemes import EMBEDDING_BLOCK, BnbInt8, BnbNf4, QuantizeRequest, Scheme

from .embedding import quantize_torch_embedding
from .output import write_torch_model


def quantize_checkpoint_bnb(ckpt_arg: str, scheme: Scheme, out: Path, base: str | None = None,
                            prompts_from: str | None = None, device: str = "cpu", log=print) -> Path:
    import torch
    from editreward_rt.backends.torch_backend import TorchGraphs, pick_device

    from .layers.bnb import swap_linears

    assert isinstance(scheme, (BnbInt8, BnbNf4))
    ckpt = open_checkpoint(ckpt_arg, base=base, prompts_from=prompts_from)
    source = {"checkpoint": ckpt.origin["checkpoint"], "files": sorted(p.name for p in ckpt.files)}
    dev = pick_device(device)
    # Non-quantized parts run in bf16 on a GPU, float32 on a CPU (no fast bf16 there for every op).
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    log(f"loading {ckpt_arg}")
    graphs = TorchGraphs(ckpt.spec, ckpt.state_dict(), dev, dtype)
    modules = {"vision": graphs.vision_module, "decoder": graphs.decoder, "heads": graphs.head_module}
    quant = scheme.to_dict()
    log(f"quantizing decoder linear layers with {scheme.name}" + (" and the vision tower" if scheme.include_vision else ""))
    swap_linears(modules, quant, dev, load_float=True)
    quant["embedding"] = quantize_torch_embedding(graphs.decoder, scheme.embedding_bits, EMBEDDING_BLOCK)
    write_torch_model(out, source, ckpt, modules, dtype, quant)
    log(f"wrote {out}")
    return out


def quantize(request: QuantizeRequest) -> Path:
    """Registry entry of ``bnb-int8`` and ``bnb-nf4``."""
    return quantize_checkpoint_bnb(request.source, request.scheme, Path(request.out), base=request.base,
                                   prompts_from=request.prompts_from, device=request.device)
