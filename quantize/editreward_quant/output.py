"""Writing a quantized model folder safely: into a temporary folder, then moved into place."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from editreward_rt.manifest import MANIFEST, open_exported, staged_folder
from editreward_rt.schemes import QuantizeError


def float_export(model_dir, scheme_name: str):
    """The exported folder a scheme starts from, opened and verified: refused unless an
    unquantized float32 export (quantizing twice, or from float16 graphs, compounds the error)."""
    model = open_exported(model_dir)
    if model.manifest.get("quantization"):
        raise QuantizeError(f"{model_dir} is already quantized ({model.manifest['quantization']['scheme']}); "
                            "start from a float export")
    if model.manifest.get("precision") != "float32":
        raise QuantizeError(f"{scheme_name} starts from a float32 export; {model_dir} is {model.manifest.get('precision')}")
    return model


def _same_model(out: Path, source_identity: dict) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("quantization", {}).get("source") == source_identity


@contextlib.contextmanager
def staged_output(out: Path, source_identity: dict):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``. An existing ``out``
    is only replaced when it holds an earlier quantization of the same source model."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not _same_model(out, source_identity):
        raise QuantizeError(f"{out} already holds something else (a different model, or other files); "
                            "choose another --out or remove it")
    with staged_folder(out, ".quantize-") as tmp:
        yield tmp


def write_torch_model(out: Path, source: dict, ckpt, modules: dict, dtype, quantization: dict) -> Path:
    """A pre-quantized torch model folder: the modules' state, tokenizer and manifest, staged."""
    from editreward_rt.manifest import write_manifest
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items() for k, v in m.state_dict().items()}
    dtype_name = str(dtype).replace("torch.", "")
    with staged_output(out, source) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        write_manifest(tmp, {
            "runtime": "torch", "family": ckpt.spec.family, "spec": ckpt.spec.to_dict(), "precision": dtype_name, "compute_dtype": dtype_name,
            "weights": "model.safetensors", "graphs": {}, "tokenizer": "tokenizer.json", "chat_text": ckpt.chat_text,
            "templates": ckpt.templates.to_dict(), "origin": ckpt.origin, "quantization": {**quantization, "source": source},
        })
    return out
