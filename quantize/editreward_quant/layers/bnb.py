"""bitsandbytes-quantized linear layers for the torch backend (schemes ``bnb-int8`` and ``bnb-nf4``).

The quantize tool swaps the decoder's linear layers (and the vision tower's, when opted in)
for bitsandbytes layers and saves their quantized state; the runtime rebuilds the same layers
from the manifest's scheme config and loads that state. The decoder's token embedding is
quantized separately (``layers.embedding``); norms and the float32 reward heads never are.
"""

from __future__ import annotations

from editreward_rt.errors import BackendError
from editreward_rt.extras import require
from editreward_rt.schemes import BnbInt8, BnbNf4, Scheme, scheme_from_dict

from .embedding import swap_empty_embedding


def _bnb():
    return require("bitsandbytes", "quant", "bitsandbytes schemes")


def _int8_layer(bnb, linear, scheme: BnbInt8):
    return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               has_fp16_weights=False, threshold=scheme.threshold)


def _nf4_layer(bnb, linear, scheme: BnbNf4):
    import torch

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=getattr(torch, scheme.compute_dtype), quant_type="nf4",
                              compress_statistics=scheme.double_quant, quant_storage=torch.uint8)
    layer.weight.blocksize = scheme.block_size  # weights per absmax scale, used when the layer quantizes
    return layer


# The layer each bitsandbytes config builds, by config class (as torchao registers a handler per config).
LAYERS = {BnbInt8: _int8_layer, BnbNf4: _nf4_layer}


def _make_layer(linear, scheme: Scheme):
    make = LAYERS.get(type(scheme))
    if make is None:
        raise BackendError(f"{scheme.name} is not a bitsandbytes scheme")
    return make(_bnb(), linear, scheme)


def quantizable_linears(module):
    """(parent, attribute, linear) for every linear layer of ``module``."""
    import torch

    for parent in module.modules():
        for attr, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                yield parent, attr, child


def swap_linears(modules: dict, scheme: Scheme, device, load_float: bool) -> None:
    """Replace the decoder's (and optionally the vision tower's) linears by bitsandbytes layers.

    ``load_float``: copy the float weights in (quantize now); otherwise leave them to be loaded
    from a quantized state dict."""
    targets = ["decoder"] + (["vision"] if scheme.include_vision else [])
    for name in targets:
        for parent, attr, linear in list(quantizable_linears(modules[name])):
            layer = _make_layer(linear, scheme)
            if load_float:
                layer.load_state_dict(linear.state_dict())
            setattr(parent, attr, layer.to(device))  # moving a bitsandbytes layer quantizes it


def load_bnb_modules(modules: dict, quant: dict, state: dict, device, dtype) -> None:
    """Registry ``load`` of the bitsandbytes schemes: rebuild the quantized embedding and linear
    layers recorded in the manifest, then load the folder's saved state into them."""
    swap_empty_embedding(modules["decoder"], quant.get("embedding"), dtype)
    swap_linears(modules, scheme_from_dict(quant), device, load_float=False)
    load_quantized_state(modules, state, device)


def load_quantized_state(modules: dict, state: dict, device) -> None:
    """Load a saved quantized state into modules whose linears were swapped with ``load_float=False``.
    4-bit layers take their packed weights and statistics through ``Params4bit``, the rest through
    ``load_state_dict``."""
    bnb = _bnb()
    for name, module in modules.items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        _load_4bit(module, own, bnb, device)
        own = {k: v for k, v in own.items() if not _is_4bit_key(module, k)}
        missing, unexpected = module.load_state_dict(own, strict=False)
        leftovers = [k for k in missing if not _is_4bit_key(module, k)]
        if leftovers or unexpected:
            raise BackendError(f"quantized weights do not fit the {name} module: missing {leftovers[:3]}, unexpected {unexpected[:3]}")
        module.to(device)


def _is_4bit_key(module, key: str) -> bool:
    prefix = key.split(".weight")[0] if ".weight" in key else None
    if prefix is None:
        return False
    try:
        layer = module.get_submodule(prefix)
    except AttributeError:
        return False
    return type(layer).__name__ == "Linear4bit"


def _load_4bit(module, state: dict, bnb, device) -> None:
    import torch

    for path, layer in module.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        key = f"{path}.weight"
        stats = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(data=state[key], quantized_stats=stats,
                                                           requires_grad=False, device=device)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(state[f"{path}.bias"].to(device), requires_grad=False)
