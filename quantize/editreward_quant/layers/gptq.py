"""GPTQ-quantized linear layers for the torch backend (scheme ``gptq-int4``).

The decoder's linear layers are GPTQModel's ``TorchLinear``: 4-bit codes packed in int32
(``qweight``), packed zero points (``qzeros``, stored as the zero points themselves: GPTQModel's
"v2" layout, which this layer reads directly), float16 group scales (``scales``), the input
channel -> group map (``g_idx``, a permutation when ``desc_act`` is on) and a float16 bias.
Each call dequantizes the weight with plain torch ops and runs one matmul, so the same folder
runs on a CPU and on a GPU; GPTQModel's CUDA kernels (Marlin, ExLlama) are never used.

GPTQModel is imported only when such a folder is loaded or written (its import takes seconds).
"""

from __future__ import annotations

from editreward_rt.errors import BackendError
from editreward_rt.extras import require

from .embedding import swap_empty_embedding

BITS = 4
LAYOUT = "gptq_v2"  # qzeros hold the zero points as they are (GPTQ v1 stored zero - 1)
KERNEL = "gptqmodel.TorchLinear"


def quant_linear_class():
    """GPTQModel's torch-kernel quantized linear layer."""
    module = require("gptqmodel.nn_modules.qlinear.torch", "gptq", "gptq-int4 models",
                     "(gptqmodel==7.6.0, in a virtual environment of its own: it pins numpy 2.2.6)")
    return module.TorchLinear


def make_quant_linear(linear, config: dict):
    """An empty packed layer with ``linear``'s shape, for the scheme ``config``."""
    import torch

    return quant_linear_class()(bits=BITS, group_size=config["group_size"], sym=config["sym"],
                                desc_act=config["desc_act"], in_features=linear.in_features,
                                out_features=linear.out_features, bias=linear.bias is not None,
                                pack_dtype=torch.int32, register_buffers=True)


def finish(layer, device):
    """Ready a packed layer to run on ``device``: eager dequantization (``optimized`` set first
    keeps GPTQModel's ``post_init`` from wrapping it in ``torch.compile``, which on a CPU means a
    C++ compile per layer before the first score)."""
    layer.to(device)
    layer.optimized = True
    layer.post_init()
    return layer.eval().requires_grad_(False)


def decoder_linears(decoder):
    """(parent, attribute, linear) for every linear layer of the decoder's layers, in execution order
    (the family's decoder layers name them: ``linear_groups``)."""
    for layer in decoder.layers:
        for group in layer.linear_groups():
            for parent, attr in group:
                yield parent, attr, getattr(parent, attr)


def load_gptq_modules(modules: dict, quant: dict, state: dict, device, dtype) -> None:
    """Registry ``load`` of ``gptq-int4``: swap the decoder's linears for empty packed layers (and the
    embedding for the recorded quantized table), load the folder's state into all three modules
    (strictly) and ready them on ``device``."""
    swap_empty_embedding(modules["decoder"], quant.get("embedding"), dtype)
    config = quant["config"]
    if config.get("include_vision"):
        raise BackendError("gptq-int4 quantizes the decoder only; this folder asks for the vision tower too")
    layout = quant.get("kernel", {}).get("layout", LAYOUT)
    if layout != LAYOUT:
        raise BackendError(f"gptq-int4 packed layout {layout!r} is not {LAYOUT!r}")
    swapped = []
    for parent, attr, linear in list(decoder_linears(modules["decoder"])):
        layer = make_quant_linear(linear, config)
        setattr(parent, attr, layer)
        swapped.append(layer)
    for name, module in modules.items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise BackendError(f"gptq-int4 weights do not fit the {name} module: "
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        module.to(device)
    for layer in swapped:
        finish(layer, device)
