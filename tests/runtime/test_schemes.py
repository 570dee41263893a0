"""The scheme registry: each config registered with its quantize (and load) function, one line each."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

from editreward_rt import schemes


def test_every_entry_resolves_its_functions():
    for name, entry in schemes.REGISTRY.items():
        assert entry.config.name == name and entry.config.version >= 1
        assert callable(entry.function("quantize"))
        assert entry.load is None or callable(entry.function("load"))
        assert (entry.load is not None) == (entry.config.target == "torch")  # torch folders have layers to rebuild


def test_flags_nothing_reads_are_gone():
    for cls in schemes.SCHEMES.values():
        assert not [f for f in ("needs_gpu_to_quantize", "needs_gpu_to_run", "needs_calibration") if hasattr(cls, f)]


CALLS = []


def fake_quantize(request: schemes.QuantizeRequest) -> Path:
    CALLS.append(request)
    return Path(request.out)


@dataclasses.dataclass(frozen=True)
class Int3(schemes.Scheme):
    name: ClassVar[str] = "test-int3"
    target: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "onnx"
    group: int = 8


def test_one_registry_line_adds_a_scheme_to_the_cli(tmp_path, monkeypatch):
    from editreward_quant.cli import main

    monkeypatch.setitem(schemes.REGISTRY, Int3.name, schemes.SchemeEntry(Int3, f"{__name__}:fake_quantize"))
    monkeypatch.setitem(schemes.SCHEMES, Int3.name, Int3)
    assert main(["--model-dir", str(tmp_path), "--scheme", "test-int3", "--option", "group=4", "--out", str(tmp_path / "q")]) == 0
    assert CALLS[-1].scheme == Int3(group=4) and CALLS[-1].source == str(tmp_path)
    assert schemes.scheme_from_dict(Int3(group=4).to_dict()) == Int3(group=4)


def test_older_configs_whose_meaning_is_unchanged_are_read():
    """ort-int8 v3 (U8U8 default) and ort-int4 v2 (blocks of 32 default) stored every option, so
    their folders still open, with the options they lacked as they were then; an unlisted older
    version is refused."""
    import pytest
    from editreward_rt.schemes import QuantizeError, scheme_from_dict

    v3 = {"scheme": "ort-int8", "version": 3, "config": {"include_vision": False, "include_heads": False, "mode": "dynamic",
                                                           "weight_type": "int8", "block_size": 128, "embedding_bits": 8}}
    assert scheme_from_dict(v3).reduce_range is False  # a v3 int8 folder's weights are full range
    v2 = {"scheme": "ort-int4", "version": 2, "config": {"include_vision": False, "include_heads": False, "block_size": 32,
                                                           "symmetric": True, "accuracy_level": 4, "embedding_bits": 8}}
    assert scheme_from_dict(v2).block_size == 32
    with pytest.raises(QuantizeError, match="version 1 is not"):
        scheme_from_dict({**v2, "version": 1})


def test_every_scheme_states_its_facts():
    """Each registered scheme carries its tolerance rows (for real backends, read back by
    ``tolerance``), a noise model that gives a finite floor, and, for torch schemes, the in-place
    quantizer the GPU matrix calls."""
    from editreward_rt.backends import BACKENDS
    from editreward_rt.tolerances import hidden_snr_floor_db, tolerance

    for name, entry in schemes.REGISTRY.items():
        cls = entry.config
        assert cls.tolerances and set(cls.tolerances) <= set(BACKENDS), name
        assert all(tolerance(backend, name) is row for backend, row in cls.tolerances.items())
        assert 0 < hidden_snr_floor_db(cls().to_dict(), WIDE) < 80, name
        assert (entry.quantize_backend is not None) == (cls.target == "torch")
        assert entry.quantize_backend is None or callable(entry.function("quantize_backend"))


class WIDE:  # a spec's text widths, all the noise models read
    class text:
        hidden_size, intermediate_size, num_layers = 512, 1408, 6


@dataclasses.dataclass(frozen=True)
class Int2(schemes.Scheme):
    """A scheme whose facts are round numbers: 10 layers x 1e-3 of noise -> 20 dB, less the margins."""

    name: ClassVar[str] = "test-int2"
    target: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "onnx"
    tolerances: ClassVar[dict] = {"onnxruntime": schemes.Tolerance(0.5, 0.25, 0.6)}
    emulation_db: ClassVar[float] = 1.0
    embedding_bits: int = 0

    def matmul_noise(self, k: int) -> tuple[float, float]:
        return 6e-4, 4e-4


def test_floor_and_tolerance_come_from_the_scheme(monkeypatch):
    import pytest
    from editreward_rt.tolerances import hidden_snr_floor_db, tolerance

    monkeypatch.setitem(schemes.REGISTRY, Int2.name, schemes.SchemeEntry(Int2, f"{__name__}:fake_quantize"))
    monkeypatch.setitem(schemes.SCHEMES, Int2.name, Int2)
    spec = type("Spec", (), {"text": type("Text", (), {"hidden_size": 64, "intermediate_size": 128, "num_layers": 10})})
    assert hidden_snr_floor_db(Int2().to_dict(), spec) == pytest.approx(20.0 - 3.0 - 1.0)
    assert hidden_snr_floor_db(Int2().to_dict(), spec, margin_db=0.0) == pytest.approx(19.0)
    # An 8-bit embedding (int8 rows over the hidden width) adds twice its noise to the layers'.
    with_embedding = 10 * (6e-4 + 4e-4) + 2 * 2 * math.log(64) / (12 * 127**2)
    assert hidden_snr_floor_db(Int2(embedding_bits=8).to_dict(), spec) == pytest.approx(-10 * math.log10(with_embedding) - 4.0)
    assert tolerance("onnxruntime", "test-int2") == schemes.Tolerance(0.5, 0.25, 0.6)
    with pytest.raises(KeyError, match="tolerances of scheme test-int2"):
        tolerance("torch", "test-int2")


def test_the_trt_precisions_are_the_trt_schemes():
    assert schemes.trt_precisions() == {"int8": "trt-int8-sq", "fp8": "trt-fp8", "int4": "trt-int4-awq"}
    assert schemes.TrtInt8Sq.emulation_db == 6.0 and schemes.TrtFp8.emulation_db == 0.0
