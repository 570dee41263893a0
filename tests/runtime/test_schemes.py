"""The scheme registry: each config registered with its quantize (and load) function, one line each."""

from __future__ import annotations

import dataclasses
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
