"""TensorRT: profiles and manifest section, the build without TensorRT, the backend's checks and
device-side bookkeeping (with a host-memory fake), and the static ONNX op-support check.

Real engines are built and compared with the reference only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from editreward_rt import Scorer
from editreward_rt.backends import trt_backend as tb
from editreward_rt.backends.cuda_memory import BufferPool, DeviceTensor, bucket_bytes, gather_batch, place_batch
from editreward_rt.errors import BackendError, ExportError, InputError, PromptTooLongError
from editreward_rt.manifest import open_exported, write_manifest
from editreward_rt.preprocess import smart_resize
from editreward_rt.schemes import trt_precisions
from editreward_trt.build import PRECISIONS, build_trt, compute_limits, compute_profiles, configure, keep_fp32_nodes
from editreward_trt.ops import available_versions, check_exported, check_model, load_support
from editreward_trt.ops import main as check_main
from onnx import TensorProto, helper


def _has_tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


has_tensorrt_and_gpu = _has_tensorrt_and_gpu()
quiet = lambda *_: None


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


@pytest.fixture(scope="module")
def tiny_fp16_onnx(tiny, tmp_path_factory):
    from editreward_export.onnx_export import export_onnx

    return export_onnx(str(tiny.checkpoint), tmp_path_factory.mktemp("onnx16") / "tiny-fp16", prompts_from=str(tiny.prompts),
                       dtype="fp16", validate_export=False, log=quiet)


@pytest.fixture(scope="module")
def built_without_trt(tiny, tmp_path_factory):
    """build_trt's default (bf16) run on a machine without TensorRT: -> (folder, the error)."""
    out = tmp_path_factory.mktemp("trt") / "tiny-bf16"
    saved = sys.modules.get("tensorrt", "absent")
    sys.modules["tensorrt"] = None
    try:
        with pytest.raises(ExportError) as info:
            build_trt(str(tiny.checkpoint), out=out, prompts_from=str(tiny.prompts), log=quiet)
    finally:
        if saved == "absent":
            del sys.modules["tensorrt"]
        else:
            sys.modules["tensorrt"] = saved
    return out, info.value


def spec_of(folder):
    return open_exported(folder, verify=False).spec


# ---------------------------------------------------------------- profiles and the manifest section


def test_default_limits_follow_the_checkpoints_image_size(tiny_onnx):
    spec = spec_of(tiny_onnx)
    limits = compute_limits(spec, log=quiet)
    # Most images become 256 tokens, but enlarging rounds up: a 1x200 image becomes 56x6356 pixels = 454 tokens.
    assert limits.max_image_tokens == 454 and smart_resize(1, 200) == (56, 6356)
    assert limits.max_seq == 2 * 454 + 1024 and limits.max_suffix == 768 and limits.heads == 2
    assert limits.max_batch == 8 and limits.prefix_batch == 4
    big = compute_limits(spec, max_image_tokens=1024, log=quiet)
    assert big.max_seq == 3072 and big.max_rows == 2 * 8 * 1024
    warnings = []
    compute_limits(spec, max_image_tokens=256, log=warnings.append)
    assert "refused at run time" in warnings[0]
    for bad in (dict(max_batch=0), dict(max_seq=10**6), dict(max_seq=100)):
        with pytest.raises(ExportError):
            compute_limits(spec, log=quiet, **bad)


def test_profiles_cover_every_input_within_min_opt_max(tiny_onnx):
    model = open_exported(tiny_onnx, verify=False)
    spec, limits = model.spec, compute_limits(model.spec, max_batch=4, log=quiet)
    profiles = compute_profiles(model.manifest, spec, limits)
    assert [p["name"] for p in profiles["decoder"]] == ["prefix", "suffix"]
    for graph, items in profiles.items():
        inputs = {i["name"]: i["shape"] for i in model.manifest["graphs"][graph]["inputs"]}
        for profile in items:
            assert set(profile["shapes"]) == set(inputs)
            for name, s in profile["shapes"].items():
                assert all(lo <= opt <= hi for lo, opt, hi in zip(s["min"], s["opt"], s["max"])), (graph, name, s)
                fixed = [d for d in inputs[name] if isinstance(d, int)]
                assert [v for v, d in zip(s["max"], inputs[name]) if isinstance(d, int)] == fixed
    vision = profiles["vision"][0]["shapes"]["patches"]
    assert vision["min"][0] == 4 and vision["opt"][0] == 4 * 256 and vision["max"][0] == 4 * 454
    prefix, suffix = (p["axes"] for p in profiles["decoder"])
    assert prefix["batch"][2] == 2 and suffix["batch"][2] == 8  # two rubric passes per triple
    assert prefix["seq"][2] == limits.max_seq and suffix["seq"][2] == limits.max_suffix
    assert prefix["past"][0] == 0 and prefix["total"][2] == limits.max_seq  # the first call has an empty cache
    past = profiles["decoder"][0]["shapes"]["past"]["max"]
    t = spec.text
    assert past == [t.num_layers, 2, 2, t.num_kv_heads, limits.max_seq, t.head_dim]
    assert profiles["heads"][0]["shapes"]["hidden"]["max"] == [4, 2, t.hidden_size]


def test_fp16_settings_keep_vision_down_projections_fp32(tiny_onnx, tmp_path):
    copy = tmp_path / "fp16"
    shutil.copytree(tiny_onnx, copy)
    manifest = configure(copy, "fp16", max_batch=2, log=quiet)
    section = manifest["trt"]
    depth = manifest["spec"]["vision"]["depth"]
    assert section["fp32_layers"]["vision"] == [f"/inner/blocks.{i}/mlp/down_proj/Gemm" for i in range(depth)]
    assert section["settings"]["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and not section["strongly_typed"]
    assert section["status"].startswith("configured")
    open_exported(copy)  # the rewritten manifest's hashes still verify
    with pytest.raises(ExportError, match="naming changed"):
        keep_fp32_nodes(copy / "vision.onnx", (r"/blocks\.(\d+)/mlp/no_such_proj/",), depth)
    assert PRECISIONS["bf16"].strongly_typed and not PRECISIONS["bf16"].flags
    # The quantized precisions are the trt-* schemes' own (one map): each names the scheme that writes its graphs.
    assert {q: PRECISIONS[q].scheme for q in PRECISIONS if PRECISIONS[q].quantized} == trt_precisions()
    assert all(PRECISIONS[q].strongly_typed for q in trt_precisions())
    assert PRECISIONS["fp32"].cleared_flags == ("TF32",)


def test_build_without_tensorrt_writes_everything_then_names_the_install(built_without_trt):
    out, error = built_without_trt
    message = str(error)
    assert "pip install 'editreward-deploy[trt]'" in message and "pypi.nvidia.com" in message
    assert {p.name for p in out.iterdir()} == {"vision.onnx", "decoder.onnx", "heads.onnx", "tokenizer.json", "manifest.json"}
    model = open_exported(out)  # hashes verify
    section = model.manifest["trt"]
    assert section["precision"] == "bf16" and section["strongly_typed"] and "engines" not in section
    assert section["limits"]["max_batch"] == 8 and section["limits"]["max_image_tokens"] == 454
    assert 0 < section["memory_estimate_gib"]["total"] < 1  # the tiny model
    assert model.manifest["precision"] == "bfloat16" and model.manifest["kv_dtype"] == "bfloat16"
    assert "bfloat16" in model.manifest["validation"]["skipped"]  # ONNX Runtime's CPU provider cannot run bf16


def _without_modelopt(monkeypatch):
    """Whatever this environment has, behave as if NVIDIA ModelOpt were not installed: the trt-* schemes
    need a module that no environment has."""
    from editreward_rt.schemes import SCHEMES, trt_precisions

    for name in trt_precisions().values():
        monkeypatch.setattr(SCHEMES[name], "modules", ("modelopt_not_installed",))


def test_build_refuses_what_it_cannot_do(tiny, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="unknown precision"):
        build_trt(str(tiny.checkpoint), precision="fp64", out=tmp_path / "x", log=quiet)
    _without_modelopt(monkeypatch)
    with pytest.raises(ExportError, match="precision int8 needs TensorRT quantization.*trt-quant"):
        build_trt(str(tiny.checkpoint), precision="int8", out=tmp_path / "q", prompts_from=str(tiny.prompts), log=quiet)
    assert not (tmp_path / "q").exists()  # refused before the export


def test_cli_reports_errors_without_a_traceback(tiny, tmp_path, monkeypatch, capsys):
    from editreward_trt.build import main

    _without_modelopt(monkeypatch)
    code = main(["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts), "--out", str(tmp_path / "o"),
                 "--precision", "int4"])
    assert code == 2 and "trt-quant" in capsys.readouterr().err


# ---------------------------------------------------------------- backend: refusals and planning


def _fake_built(folder, tmp_path, **build):
    copy = tmp_path / "built"
    shutil.copytree(folder, copy)
    model = open_exported(copy, verify=False)
    manifest = dict(model.manifest)
    limits = compute_limits(model.spec, log=quiet)
    manifest["trt"] = {"status": "built", "precision": "fp32", "limits": {"max_seq": limits.max_seq,
                                                                         "max_image_tokens": limits.max_image_tokens},
                       "profiles": compute_profiles(manifest, model.spec, limits),
                       "engines": {g: {"file": f"{g}.engine"} for g in tb.GRAPHS},
                       "build": {"tensorrt_version": "10.15.1", "gpu": {"name": "NVIDIA L4", "compute_capability": [8, 9]},
                                 **build}}
    for graph in tb.GRAPHS:  # stand-in engine files, hashed like real ones
        (copy / f"{graph}.engine").write_bytes(b"not a real engine")
    write_manifest(copy, manifest)
    return copy


def test_backend_without_tensorrt_names_the_extra(tiny_onnx, tmp_path, no_tensorrt):
    folder = _fake_built(tiny_onnx, tmp_path)
    with pytest.raises(BackendError, match=r"pip install 'editreward-deploy\[trt\]'"):
        tb.TrtBackend(folder, device="cuda")
    with pytest.raises(BackendError, match="editreward-deploy"):
        Scorer.load(folder, backend="tensorrt", device="cuda")


def test_backend_refuses_folders_without_engines(tiny_onnx, built_without_trt):
    with pytest.raises(BackendError, match="no 'trt' section"):
        tb.TrtBackend(tiny_onnx, device="cuda")
    with pytest.raises(BackendError, match="never built"):
        tb.TrtBackend(built_without_trt[0], device="cuda")
    with pytest.raises(BackendError, match="device='cuda'"):
        tb.TrtBackend(tiny_onnx, device="cpu")
    assert tb.parse_device("cuda:1") == 1 and tb.parse_device("auto") == 0


def test_engines_from_another_gpu_or_tensorrt_are_refused():
    section = {"build": {"tensorrt_version": "10.15.1", "gpu": {"name": "NVIDIA L4", "compute_capability": [8, 9]}}}
    tb.check_compatible(section, "10.15.1", {"name": "NVIDIA L4", "compute_capability": [8, 9]})
    with pytest.raises(BackendError, match=r"TensorRT 10.15.1 and this is TensorRT 10.3.0.*tensorrt==10.15.1"):
        tb.check_compatible(section, "10.3.0", {"name": "NVIDIA L4", "compute_capability": [8, 9]})
    with pytest.raises(BackendError, match=r"built for NVIDIA L4 \(compute capability 8.9\).*H100.*9.0.*build_trt"):
        tb.check_compatible(section, "10.15.1", {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]})
    with pytest.raises(BackendError, match="timed on NVIDIA L4; this GPU is NVIDIA RTX 4090"):
        tb.check_compatible(section, "10.15.1", {"name": "NVIDIA RTX 4090", "compute_capability": [8, 9]})


def test_inputs_beyond_the_engine_limits_are_refused_up_front(fast, images):
    triple = fast.prepare("Add a bowl", images[0], images[1])
    longest = max(len(p.ids) for p in triple.prompts)
    tb.check_inputs([triple], fast.spec, {"max_seq": longest, "max_image_tokens": 454})
    with pytest.raises(PromptTooLongError, match="--max-seq"):
        tb.check_inputs([triple], fast.spec, {"max_seq": longest - 1, "max_image_tokens": 454})
    with pytest.raises(InputError, match="--max-image-tokens"):
        tb.check_inputs([triple], fast.spec, {"max_seq": 10**5, "max_image_tokens": triple.source.n_tokens - 1})


def test_decoder_calls_are_matched_to_profiles_and_split(tiny_onnx):
    model = open_exported(tiny_onnx, verify=False)
    profiles = compute_profiles(model.manifest, model.spec, compute_limits(model.spec, log=quiet))["decoder"]
    assert tb.plan(profiles, 16, {"seq": 300, "past": 600, "total": 900}) == (1, 16)  # rubric passes: suffix profile
    assert tb.plan(profiles, 8, {"seq": 580, "past": 20, "total": 600}) == (1, 16)  # usual per-triple prefixes too
    assert tb.plan(profiles, 1, {"seq": 1200, "past": 0, "total": 1200}) == (0, 4)  # long segment: prefix profile
    assert tb.plan(profiles, 16, {"seq": 1200, "past": 20, "total": 1220}) == (0, 4)  # -> four chunks of 4
    assert tb.plan(profiles, 1, {"seq": 1933, "past": 0, "total": 1933}) is None
    index = np.array([[0, 1, -1], [2, 3, -1], [4, 5, -1], [-1, -1, -1], [0, 1, -1]])
    assert tb.batch_chunks(index, 2, 100) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert tb.batch_chunks(index, 5, 3) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 5)]  # halved for rows
    with pytest.raises(InputError, match="image rows"):
        tb.batch_chunks(index, 5, 1)
    used, local = tb.local_rows(index[2:4])
    assert used.tolist() == [4, 5] and local.tolist() == [[0, 1, -1], [-1, -1, -1]]
    keep = np.array([[0, 2], [1, 1], [3, 0], [4, 2]])  # the (row, position) pairs kept, [R, 2]
    picked, local = tb.keep_in_chunk(keep, slice(2, 4))
    assert picked.tolist() == [2] and local.tolist() == [[[1, 0]]]  # rows counted from the chunk's first
    picked, local = tb.keep_in_chunk(keep, slice(2, 3))  # nothing kept: one row computed, then dropped
    assert picked.tolist() == [] and local.shape == (1, 1, 2)
    assert tb.keep_in_chunk(None, slice(0, 2))[0].tolist() == []


# ---------------------------------------------------------------- device bookkeeping, on a host-memory fake


class FakeMemory:
    """The CudaMemory interface over one numpy byte array (pointers are offsets)."""

    handle = 0

    def __init__(self, size=1 << 22):
        self.heap, self.top, self.freed = np.zeros(size, np.uint8), 256, []

    def malloc(self, n):
        ptr, self.top = self.top, self.top + n
        assert self.top <= len(self.heap)
        return ptr

    def free(self, ptr):
        self.freed.append(ptr)

    def copy_2d(self, dst, dst_pitch, src, src_pitch, width, height):
        for r in range(height):
            self.heap[dst + r * dst_pitch:dst + r * dst_pitch + width] = self.heap[src + r * src_pitch:src + r * src_pitch + width].copy()

    def h2d(self, ptr, array):
        self.heap[ptr:ptr + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)

    def d2h(self, array, ptr):
        np.copyto(array, self.heap[ptr:ptr + array.nbytes].view(array.dtype).reshape(array.shape))

    def synchronize(self):
        pass


def _upload(mem, pool, key, array):
    t = pool.tensor(key, array.shape, array.itemsize)
    mem.h2d(t.ptr, array)
    return t


def _download(mem, t, dtype=np.float32):
    out = np.empty(t.shape, dtype)
    mem.d2h(out, t.ptr)
    return out


def test_buckets_grow_rarely_and_waste_little():
    sizes = [1, 255, 256, 257, 1000, 4096, 10**6, 1411383296]
    for n in sizes:
        b = bucket_bytes(n)
        assert n <= b <= max(256, n * 1.125 + 256) and b % 256 == 0
    assert bucket_bytes(1000) == bucket_bytes(1020)  # nearby shapes share a buffer


def test_pool_reuses_buffers_and_detects_stale_caches():
    mem = FakeMemory()
    pool = BufferPool(mem)
    a = pool.tensor("k", (10, 10), 4)
    b = pool.tensor("k", (5, 10), 4)  # smaller: same buffer, new generation
    assert b.buffer is a.buffer and mem.freed == []
    with pytest.raises(BackendError, match="stale"):
        a.ptr
    c = pool.tensor("k", (100, 100), 4)  # larger: reallocated
    assert mem.freed == [a.buffer.ptr] and c.buffer.capacity >= 40000
    pool.tensor(("x", 0), (4,), 4)
    first = pool.buffers[("x", 0)]
    assert pool.other((("x", 0), ("x", 1)), first) == ("x", 1)
    assert pool.other((("x", 0), ("x", 1)), c.buffer) == ("x", 0)


@pytest.mark.parametrize("axis", [2, 0, 3])
def test_cache_rows_are_gathered_and_placed_on_the_device(axis):
    """Along the layout's batch axis (2 in the family's [L, 2, B, kv, P, d]; others as a family may declare)."""
    mem, rng = FakeMemory(), np.random.default_rng(0)
    pool = BufferPool(mem)
    shape = (3, 2, 4, 2, 5, 3)
    with_batch = lambda b: shape[:axis] + (b,) + shape[axis + 1:]
    cache = rng.standard_normal(with_batch(4)).astype(np.float32)
    src = _upload(mem, pool, "src", cache)
    rows = np.array([2, 0, 0, 1, 2, 3])
    dst = pool.tensor("dst", with_batch(len(rows)), 4)
    np.testing.assert_array_equal(_download(mem, gather_batch(mem, src, rows, dst, axis)), np.take(cache, rows, axis=axis))
    whole = pool.tensor("whole", with_batch(7), 4)
    parts = np.split(rng.standard_normal(with_batch(7)).astype(np.float32), [3, 5], axis=axis)
    for i, (offset, part) in enumerate(zip((0, 3, 5), parts)):
        place_batch(mem, _upload(mem, pool, ("part", i), np.ascontiguousarray(part)), whole, offset, axis)
    np.testing.assert_array_equal(_download(mem, whole), np.concatenate(parts, axis=axis))
    if axis == 2:
        empty = DeviceTensor(src.buffer, (3, 2, 4, 2, 0, 3), 4, src.generation)
        assert gather_batch(mem, empty, rows, pool.tensor("e", (3, 2, 6, 2, 0, 3), 4), axis).nbytes == 0


class FakeDecoderRunner:
    """Stands in for the decoder engine: hidden = f(ids, image rows, past) at the rows kept, present = past ++ new rows.

    It refuses batches beyond its profile's maximum, so chunked calls are really chunked."""

    def __init__(self, mem, pool, spec, profiles):
        self.mem, self.pool, self.spec, self.profiles, self.calls = mem, pool, spec, profiles, []

    def run(self, profile, inputs, outputs=None):
        ids, table, index = inputs["input_ids"], inputs["image_embeds"], inputs["image_index"]
        b, s = ids.shape
        assert b <= self.profiles[profile]["axes"]["batch"][2] and len(table) <= self.profiles[profile]["axes"]["rows"][2]
        self.calls.append((profile, b))
        past = _download(self.mem, inputs["past"])
        rows = np.where(index[..., None] >= 0, table[np.maximum(index, 0)][..., :1], 0.0)
        new = np.broadcast_to((ids[..., None] + rows)[None, None, :, None, :, :1],
                              past.shape[:2] + (b, past.shape[3], s, past.shape[5])).astype(np.float32)
        present = np.concatenate([past, new], axis=4)
        hidden = np.repeat(ids[..., None] + rows + past.sum(axis=(0, 1, 3, 4, 5))[:, None, None], self.spec.text.hidden_size, -1)
        keep = inputs["keep"]  # [n, 1, 2]: the graph's last layer computes these rows alone
        assert keep.shape[0] >= 1 and keep.shape[1:] == (1, 2) and (keep[..., 0] < b).all()
        hidden = hidden[keep[..., 0], keep[..., 1]]
        out = {"hidden": _upload(self.mem, self.pool, ("fake", "hidden"), hidden.astype(np.float32))}
        given = (outputs or {}).get("present")
        target = given if given is not None else self.pool.tensor(("fake", "present"), present.shape, 4)
        assert target.shape == present.shape
        self.mem.h2d(target.ptr, np.ascontiguousarray(present))
        out["present"] = target
        return out


def _fake_engine(spec, profiles, manifest):
    from editreward_rt.backends.cuda_memory import DeviceBuffer
    from editreward_rt.families import family_for

    engine = tb.TrtGraphs.__new__(tb.TrtGraphs)
    engine.spec, engine.mem = spec, FakeMemory(1 << 24)
    engine.pool, engine.profiles, engine.kv_itemsize = BufferPool(engine.mem), {"decoder": profiles}, 4
    engine.empty = DeviceBuffer(engine.mem.malloc(256), 256)
    engine.cache = family_for(spec).cache_layout("float32")
    engine.runners = {"decoder": FakeDecoderRunner(engine.mem, engine.pool, spec, profiles)}
    engine.declared = {n: g["inputs"] for n, g in manifest["graphs"].items()}
    engine.batch_axis, engine.rows_axis = "batch", "rows"
    engine.inputs = {n: [i["name"] for i in g["inputs"]] for n, g in manifest["graphs"].items()}
    engine.outputs = {n: [o["name"] for o in g["outputs"]] for n, g in manifest["graphs"].items()}
    return engine


def test_chunked_decode_equals_one_call(tiny_onnx):
    """The batch split across profiles (gathered past, stitched present) gives what one big call gives."""
    model = open_exported(tiny_onnx, verify=False)
    spec, limits = model.spec, compute_limits(model.spec, max_batch=2, log=quiet)
    small = compute_profiles(model.manifest, spec, limits)["decoder"]
    roomy = json.loads(json.dumps(small))
    roomy[1]["axes"]["batch"][2] = 64
    rng = np.random.default_rng(1)
    b, s = 7, 3
    args = (rng.integers(0, 50, (b, s)), rng.standard_normal((6, spec.text.hidden_size)).astype(np.float32),
            rng.integers(-1, 6, (b, s)), np.tile(np.arange(4, 4 + s), (b, 1)), np.ones((b, 4 + s), np.int64))
    results = []
    for profiles in (roomy, small):
        engine = _fake_engine(spec, profiles, model.manifest)
        first, cache = engine.decode(args[0][:1, :2], args[1], np.full((1, 2), -1), np.arange(2)[None], np.ones((1, 2), np.int64),
                                     engine.empty_cache(1), None)
        second, cache = engine.decode(args[0][:1, :2], args[1], np.full((1, 2), -1), np.arange(2, 4)[None],
                                      np.ones((1, 4), np.int64), cache, None)
        past = engine.select(cache, np.zeros(b, np.int64))
        every = np.stack(np.meshgrid(np.arange(b), np.arange(s), indexing="ij"), axis=-1)  # keep all [b, s] rows
        hidden, present = engine.decode(*args, past, every)
        results.append((hidden, _download(engine.mem, present), engine.runners["decoder"].calls))
    (h1, p1, calls1), (h2, p2, calls2) = results
    assert calls1[-1] == (1, 7) and [c for c in calls2[2:]] == [(1, 4), (1, 3)]
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape[2] == b and p1.shape[4] == 4 + s


# ---------------------------------------------------------------- static op-support check


def test_stored_support_lists_name_their_source():
    assert set(available_versions()) >= {"10.0", "10.15"}
    for version in available_versions():
        data = load_support(version)
        assert data["tensorrt_version"] == version and data["source"]["url"].startswith("https://github.com/onnx/onnx-tensorrt/")
        assert data["operators"]["MatMul"]["types"] == ["FP32", "FP16", "BF16"]
        assert not data["operators"]["NonMaxSuppression"].get("restrictions") and not data["operators"]["Unique"]["supported"]
    assert len(load_support("10.0")["source"]["commit"]) == 40


@pytest.mark.parametrize("version", available_versions())
def test_tiny_graphs_use_only_what_tensorrt_parses(tiny_onnx, tiny_fp16_onnx, built_without_trt, version):
    for folder in (tiny_onnx, tiny_fp16_onnx, built_without_trt[0]):  # fp32, fp16, bf16
        report = check_exported(folder, version)
        assert report.violations == [], "\n".join(map(str, report.violations))
        assert report.nodes > 100


def _model(nodes, inputs, outputs, initializers=(), opset=17, domains=None):
    graph = helper.make_graph(nodes, "bad", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    return helper.make_model(graph, opset_imports=imports)


def test_unsupported_ops_types_attributes_and_opsets_are_flagged(tmp_path, capsys):
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    i64 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.INT64, shape)
    cases = {
        "op": _model([helper.make_node("Det", ["x"], ["y"])], [f32("x", [3, 3])], [f32("y", [])]),
        "dtype": _model([helper.make_node("Clip", ["i", "lo"], ["o"])], [i64("i", [4])], [i64("o", [4])],
                        [helper.make_tensor("lo", TensorProto.INT64, [], [0])]),
        "matmul int": _model([helper.make_node("MatMul", ["a", "b"], ["c"])],
                             [helper.make_tensor_value_info(n, TensorProto.INT32, [2, 2]) for n in "ab"],
                             [helper.make_tensor_value_info("c", TensorProto.INT32, [2, 2])]),
        "domain": _model([helper.make_node("FancyAttention", ["x"], ["y"], domain="com.example")], [f32("x", [2])], [f32("y", [2])],
                         domains={"com.example": 1}),
        "attribute": _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
                            [f32("x", [1, 1, 8, 8])], [f32("y", [1, 1, 6, 6])]),
        "dynamic axes": _model([helper.make_node("Squeeze", ["x", "axes"], ["y"])], [f32("x", [1, 4]), i64("axes", [1])],
                               [f32("y", [4])]),
        "opset": _model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])], opset=25),
    }
    expected = {"op": "not supported", "dtype": "input 0 (input) is INT64", "matmul int": "is INT32",
                "domain": "plugin", "attribute": "dilations", "dynamic axes": "build-time constant", "opset": "opset 25"}
    for name, model in cases.items():
        report = check_model(model, "10.15", label=name)
        assert any(expected[name] in str(v) for v in report.violations), (name, [str(v) for v in report.violations])
    onnx.save(cases["dtype"], str(tmp_path / "bad.onnx"))
    assert check_main([str(tmp_path / "bad.onnx"), "--trt-version", "all"]) == 1
    out = capsys.readouterr().out
    assert "[TensorRT 10.0] bad: Clip node" in out and "[TensorRT 10.15]" in out


def test_check_cli_on_an_export(tiny_onnx, capsys):
    assert check_main([str(tiny_onnx)]) == 0
    assert "OK" in capsys.readouterr().out


# ---------------------------------------------------------------- real engines (TensorRT and a GPU only)


@pytest.mark.skipif(not has_tensorrt_and_gpu, reason="needs TensorRT and an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engines_match_the_reference(tiny, reference, images, tmp_path, precision):
    from editreward_rt.tolerances import max_abs_diff, tolerance

    out = build_trt(str(tiny.checkpoint), precision=precision, max_batch=4, out=tmp_path / precision,
                    prompts_from=str(tiny.prompts), log=quiet)
    assert {"vision.engine", "decoder.engine", "heads.engine"} <= {p.name for p in out.iterdir()}
    scorer = Scorer.load(out, device="cuda")  # the manifest names tensorrt as its runtime
    assert scorer.description["backend"] == "tensorrt"
    triples = [reference.prepare("Add a bowl", images[0], images[i]) for i in (1, 2, 3)]
    expected = reference.backend.head_outputs(triples)
    tol = tolerance("tensorrt", {"fp32": "float32", "bf16": "bfloat16"}[precision])
    diff = max_abs_diff(scorer.backend.head_outputs(triples), expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    cached = tb.TrtBackend(out, device="cuda", cuda_graphs=True)
    first, again = cached.head_outputs(triples), cached.head_outputs(triples)  # second call captures CUDA graphs
    np.testing.assert_allclose(first, again, atol=1e-6)
    # Same shapes, other pixels: replayed graphs must read the new inputs, not stale buffers.
    from PIL import Image

    mirrored = [reference.prepare("Add a bowl", images[0], images[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
                for i in (1, 2, 3)]
    assert [p.ids.shape for t in mirrored for p in t.prompts] == [p.ids.shape for t in triples for p in t.prompts]
    replayed = cached.head_outputs(mirrored)
    np.testing.assert_allclose(replayed, scorer.backend.head_outputs(mirrored), atol=1e-5)
    assert np.abs(replayed - first).max() > 1e-4


# ---------------------------------------------------------------- builder code paths, on a fake tensorrt module


class FakeTrt:
    """Just enough of the tensorrt module's surface for editreward_trt.tensorrt_api, recording what it is asked."""

    __version__ = "10.15.1"
    float32, float16, bfloat16 = "FLOAT", "HALF", "BF16"
    calls: list = []

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, BF16, TF32, OBEY_PRECISION_CONSTRAINTS = "FP16", "BF16", "TF32", "OBEY_PRECISION_CONSTRAINTS"

    class LayerType:
        CONSTANT, SHUFFLE, MATRIX_MULTIPLY, ELEMENTWISE = "constant", "shuffle", "matmul", "elementwise"

    class IProgressMonitor:
        def __init__(self):
            pass


class _Tensor:
    def __init__(self, name, dtype="FLOAT"):
        self.name, self.dtype = name, dtype


class _Layer:
    def __init__(self, name, type_, outputs):
        self.name, self.type, self.outputs, self.precision, self.output_types = name, type_, outputs, None, {}
        self.num_outputs = len(outputs)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class _Network:
    def __init__(self, layers):
        self.layers, self.num_layers = layers, len(layers)

    def get_layer(self, i):
        return self.layers[i]


def _fake_trt(parse_ok=True, layers=()):
    trt = FakeTrt()
    calls = trt.calls = []

    class Config:
        progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("set", flag))

        def clear_flag(self, flag):
            calls.append(("clear", flag))

        def create_timing_cache(self, data):
            calls.append(("cache-in", bytes(data)))
            return "cache"

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def get_timing_cache(self):
            return type("Cache", (), {"serialize": lambda self: b"TIMING"})()

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("network-flags", flags))
            return _Network(list(layers))

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class Error:
        def __init__(self, i):
            self.i = i

        def node(self):
            return self.i

        def node_name(self):
            return f"/n{self.i}"

        def node_operator(self):
            return "Clip"

        def desc(self):
            return f"problem {self.i}"

        def code(self):
            return "UNSUPPORTED_NODE"

    class Parser:
        num_errors = 0 if parse_ok else 3

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return Error(i)

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def test_parser_errors_are_all_carried_by_the_exception(tiny_onnx, tmp_path):
    from editreward_trt.tensorrt_api import build_engine

    section = {"strongly_typed": True, "workspace_gb": 1, "settings": {"flags": [], "cleared_flags": []},
               "profiles": {"heads": []}}
    with pytest.raises(ExportError) as info:
        build_engine(_fake_trt(parse_ok=False), tiny_onnx / "heads.onnx", tmp_path / "heads.engine", section, [], None, quiet)
    assert "3 error(s)" in str(info.value) and all(f"'/n{i}' (Clip): problem {i}" in str(info.value) for i in range(3))
    assert not (tmp_path / "heads.engine").exists()


def test_build_engine_sets_flags_profiles_cache_and_fp32_pins(tiny_onnx, tmp_path):
    from editreward_trt.tensorrt_api import build_engine

    copy = tmp_path / "fp16"
    shutil.copytree(tiny_onnx, copy)
    section = configure(copy, "fp16", max_batch=2, workspace_gb=0.5, log=quiet)["trt"]
    nodes = section["fp32_layers"]["vision"]
    layers = [_Layer(nodes[0], "matmul", [_Tensor("(Unnamed Layer* 7) [Matrix Multiply]_output")]),
              _Layer("(Unnamed Layer* 8) [ElementWise]", "elementwise", [_Tensor(nodes[0] + "_output_0")]),
              _Layer(nodes[1], "matmul", [_Tensor("x")]), _Layer("weights", "constant", [_Tensor(nodes[1] + "_output_0")]),
              _Layer("/inner/blocks.0/mlp/up_proj/Gemm", "matmul", [_Tensor("y")])]
    trt = _fake_trt(layers=layers)
    (tmp_path / "cache").write_bytes(b"OLD")
    build_engine(trt, copy / "vision.onnx", copy / "vision.engine", section, nodes, str(tmp_path / "cache"), quiet)
    assert (copy / "vision.engine").read_bytes() == b"ENGINE" and (tmp_path / "cache").read_bytes() == b"TIMING"
    assert ("network-flags", 0) in trt.calls and ("workspace", 2**29) in trt.calls and ("cache-in", b"OLD") in trt.calls
    assert ("set", "FP16") in trt.calls and ("set", "OBEY_PRECISION_CONSTRAINTS") in trt.calls
    profile = dict(trt.calls)["profile"]
    assert profile["patches"] == tuple(section["profiles"]["vision"][0]["shapes"]["patches"][k] for k in ("min", "opt", "max"))
    assert [l.precision for l in layers] == ["FLOAT", "FLOAT", "FLOAT", None, None]  # matmuls, bias add; not constants
    with pytest.raises(ExportError, match="no TensorRT layer named after"):
        build_engine(_fake_trt(layers=layers[2:]), copy / "vision.onnx", copy / "vision.engine", section, nodes, None, quiet)


def test_progress_monitor_reports_top_level_phases():
    from editreward_trt.tensorrt_api import _progress

    lines = []
    monitor = _progress(FakeTrt(), lines.append)
    monitor.phase_start("Building engine", None, 4)
    monitor.phase_start("Tactic search", "Building engine", 100)  # nested: not printed
    assert all(monitor.step_complete("Building engine", step) for step in range(4))
    monitor.phase_finish("Building engine")
    assert lines[0] == "  Building engine: 4 steps" and "  Building engine: 100%" in lines and "done in" in lines[-1]


def test_onnx_only_stops_before_the_build(tiny, tmp_path):
    """``build_trt.py --onnx-only`` writes everything a TensorRT build reads (graphs, profiles,
    manifest, the op check) and no engine, on a machine without TensorRT."""
    import subprocess

    from conftest import ROOT

    out = tmp_path / "onnx-only"
    done = subprocess.run([sys.executable, "export/build_trt.py", "--ckpt", str(tiny.checkpoint), "--prompts-from",
                           str(tiny.prompts), "--precision", "bf16", "--onnx-only", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "bfloat16" and manifest["trt"]["status"].startswith("configured")
    assert manifest["trt"]["op_check"]["violations"] == [] and manifest["trt"]["op_check"]["nodes"] > 100
    assert set(manifest["trt"]["profiles"]) == {"vision", "decoder", "heads"}
    assert not list(out.glob("*.engine"))
