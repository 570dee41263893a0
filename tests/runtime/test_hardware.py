"""What ``auto`` means: the CPU's flags read from /proc/cpuinfo, a GPU's compute capability, and
the precision each resolves to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editreward_rt import hardware
from editreward_rt.errors import BackendError

SAPPHIRE_RAPIDS = "fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 avx512f avx512_vnni avx512_bf16"
SKYLAKE_X = "fpu sse2 avx2 avx512f"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    core = "processor\t: {n}\nmodel name\t: some CPU\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
    path.write_text(core.format(n=0, flags=flags) + core.format(n=1, flags=flags))
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a Linux /proc/cpuinfo")
def test_cpu_flags_are_the_flags_line(tmp_path):
    flags = hardware.cpu_flags(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    assert flags == frozenset(SAPPHIRE_RAPIDS.split())
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()


def test_cpu_flags_elsewhere_than_linux_read_as_none(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hardware.cpu_flags(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS)) == frozenset()


@pytest.mark.parametrize("flags,bf16,units", [
    (SAPPHIRE_RAPIDS, True, {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"}),
    (ZEN4, True, {"avx512_bf16", "avx512_vnni", "avx512f", "avx2"}),
    (SKYLAKE_X, False, {"avx512f", "avx2"}),
    ("", False, set()),
])
def test_auto_is_bf16_where_the_cpu_has_bf16_units(flags, bf16, units, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a: frozenset(flags.split()))
    assert hardware.native_bf16("cpu") is bf16
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if bf16 else "fp32")
    assert hardware.resolve_precision("fp32", "cpu") == "fp32" and hardware.resolve_precision("bf16", "cpu") == "bf16"
    assert hardware.cpu_matrix_units() == {u: u in units for u in hardware.MATRIX_UNITS}


def test_a_gpu_is_bf16_native_from_compute_capability_8():
    assert hardware.native_bf16("cuda:1", cuda_capability=(8, 0)) and hardware.native_bf16("cuda", cuda_capability=(9, 0))
    assert not hardware.native_bf16("cuda", cuda_capability=(7, 5))
    assert hardware.resolve_precision("auto", "cuda:0", cuda_capability=(8, 6)) == "bf16"


def test_unknown_precisions_and_devices_are_refused():
    with pytest.raises(BackendError, match="unknown precision 'fp16'; use fp32, bf16, auto"):
        hardware.resolve_precision("fp16", "cpu")
    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        hardware.native_bf16("tpu")
    assert hardware.precision_of("bfloat16") == "bf16"
    with pytest.raises(BackendError, match="no precision computes in dtype 'int8'"):
        hardware.precision_of("int8")


def test_it_imports_no_torch_nor_engine():
    code = ("import sys, editreward_rt.hardware as h; h.resolve_precision('auto', 'cpu'); h.cpu_matrix_units()\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
