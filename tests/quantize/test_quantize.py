"""Quantization schemes that run on a CPU, end to end: quantize, load, score, parity floors."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import hidden_at_reward, save
from editreward_quant.calib import load_triples, synthetic_triples
from editreward_quant.cli import main as quantize_main
from editreward_quant.ort_schemes import quantize_exported, weight_bytes
from editreward_rt import Scorer
from editreward_rt.schemes import SCHEMES, QuantizeError, check_available, make_scheme, scheme_from_dict
from editreward_rt.tolerances import hidden_snr_floor_db, max_abs_diff, snr_db, tolerance

# bitsandbytes (the quant extra) is needed by the bnb-* schemes only; the ONNX Runtime ones run without it.
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (the quant extra) is not installed")

CPU_SCHEMES = [("ort-int8", {}), ("ort-int8", {"mode": "weight_only"}), ("ort-int4", {}), ("ort-int4", {"embedding_bits": 4, "block_size": 32}),
               ("bnb-int8", {}), ("bnb-nf4", {}), ("bnb-nf4", {"embedding_bits": 4})]


@pytest.fixture(scope="module")
def quantized(tiny, tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, options in CPU_SCHEMES:
        if "bitsandbytes" in SCHEMES[name].modules and not HAS_BNB:
            continue
        label = name + "".join(f"-{v}" for v in options.values())
        args = ["--scheme", name, "--out", str(root / label)] + [f"--option={k}={v}" for k, v in options.items()]
        if SCHEMES[name].target == "onnx":  # an exported folder in, not a checkpoint
            args += ["--model-dir", str(tiny_onnx)]
        else:
            args += ["--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts)]
        assert quantize_main(args) == 0
        out[label] = root / label
    return out


@pytest.mark.parametrize("label", ["ort-int8", "ort-int8-weight_only", "ort-int4", "ort-int4-4-32"]
                         + [pytest.param(label, marks=needs_bnb) for label in ("bnb-int8", "bnb-nf4", "bnb-nf4-4")])
def test_scheme_meets_its_floors(label, quantized, fast, reference, triples):
    scorer = Scorer.load(quantized[label])
    manifest = scorer.backend.model.manifest
    scheme = manifest["quantization"]["scheme"]
    assert label.startswith(scheme)
    assert scheme_from_dict(manifest["quantization"]).to_dict()["config"] == manifest["quantization"]["config"]
    tol = tolerance(scorer.description["backend"], scheme)
    hidden, scores = hidden_at_reward(scorer, triples)
    expected_hidden, _ = hidden_at_reward(fast, triples)
    floor = hidden_snr_floor_db(scorer.backend.model.manifest["quantization"], scorer.spec)
    assert snr_db(expected_hidden, hidden) >= floor
    expected = reference.backend.head_outputs([reference.prepare(*t) for t in triples])
    actual = scorer.backend.head_outputs([scorer.prepare(*t) for t in triples])
    diff = max_abs_diff(actual, expected)
    assert diff["mu"] <= tol.mu and diff["log_sigma"] <= tol.log_sigma, diff
    assert all(np.isfinite(s.mu) for s in scores)


@pytest.mark.parametrize("label", ["ort-int8", "ort-int8-weight_only", "ort-int4", "ort-int4-4-32"]
                         + [pytest.param(label, marks=needs_bnb) for label in ("bnb-int8", "bnb-nf4", "bnb-nf4-4")])
def test_scheme_keeps_the_ranking(label, quantized, reference):
    """The task-level gate beside the SNR floor: ranking 8 edits of one source (28 pairs), the
    quantized model prefers the reference's edit on at least the tolerance's share of pairs."""
    import itertools

    from conftest import random_image

    scorer = Scorer.load(quantized[label])
    tol = tolerance(scorer.description["backend"], scorer.backend.model.manifest["quantization"]["scheme"])
    source, edits = random_image(100, 300, 400), [random_image(200 + i, 240 + 30 * i, 320) for i in range(8)]
    want = [s.mu for s in reference.rank("Add a green bowl", source, edits)]
    got = [s.mu for s in scorer.rank("Add a green bowl", source, edits)]
    pairs = list(itertools.combinations(range(len(edits)), 2))
    agreement = np.mean([np.sign(got[i] - got[j]) == np.sign(want[i] - want[j]) for i, j in pairs])
    assert agreement >= tol.agreement, agreement


def test_the_floor_model_separates_a_saturating_kernel():
    """On tiny, the int8 floor is 3 dB above what U8S8 gave on an AVX2-only CPU (22.0 dB), and each
    4-bit floor is below its 8-bit counterpart: the model ranks precisions the way bits say. (The
    CPU-independence gate itself is the exactness test below.)"""
    from editreward_families.qwen2_5_vl.fixture import SIZES

    class Dims:  # tiny's text widths
        hidden_size, intermediate_size, num_layers = SIZES["tiny"].hidden, SIZES["tiny"].intermediate, SIZES["tiny"].layers

    spec = type("Spec", (), {"text": Dims})
    floor = lambda name, **options: hidden_snr_floor_db(make_scheme(name, options).to_dict(), spec)
    assert floor("ort-int8") > 22.0 + 3
    assert floor("ort-int4") < floor("ort-int8", mode="weight_only") - 18  # 4 bits fewer: about 24 dB less
    assert floor("ort-int4", block_size=32) > floor("ort-int4")  # smaller blocks (the default is 128), smaller absmax


def test_vision_and_heads_keep_their_precision(quantized, tiny_onnx):
    manifest = json.loads((quantized["ort-int4"] / "manifest.json").read_text())
    assert manifest["quantization"]["graphs"] == ["decoder"]
    for graph in ("vision", "heads"):
        assert (quantized["ort-int4"] / f"{graph}.onnx").read_bytes() == (tiny_onnx / f"{graph}.onnx").read_bytes()


@pytest.mark.parametrize("label, bf16_ratio, embedding_bits", [("ort-int8", 0.56, 8), ("ort-int8-weight_only", None, 8),
                                                               ("ort-int4", 0.40, 8), ("ort-int4-4-32", 0.33, 4)])
def test_decoder_weights_shrink_embedding_included(label, bf16_ratio, embedding_bits, quantized, tiny_onnx):
    """Every weight matrix of the decoder, the token embedding included, is stored quantized: no
    float32 initializer is left larger than a scale tensor, and the graph's weight bytes are near
    the scheme's bits per weight. Tiny's float scales, norms and biases are a larger share than on
    bigger models (hidden size 64: a float32 scale per 64 weights), and its 64-wide matrices pad
    to one 128-block in weight-only mode, so the ratios asserted here sit above those measured on
    the small fixture by ``benchmarks/cpu_suite.sh`` (ort-int4's default blocks of 64: 0.367 here)."""
    import onnx

    def largest_float(folder):
        graph = onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph
        return max(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)

    assert largest_float(quantized[label]) * 16 <= largest_float(tiny_onnx)
    if bf16_ratio is not None:
        assert weight_bytes(quantized[label]) <= bf16_ratio * weight_bytes(tiny_onnx) / 2
    tables = json.loads((quantized[label] / "manifest.json").read_text())["quantization"]["embedding"]["decoder"]["tables"]
    assert [t["bits"] for t in tables] == [embedding_bits]


@pytest.mark.parametrize("bits, block, width", [(8, 32, 64), (4, 32, 64), (4, 32, 80), (4, 128, 64), (4, 16, 33)])
def test_embedding_lookup_error_is_within_half_a_step(bits, block, width):
    """The quantized lookup on ONNX Runtime returns every row within half a quantization step of
    the float table, for widths that are not a multiple of the block and an odd width (8 bits)."""
    import onnx
    import onnxruntime
    from editreward_quant.ort_schemes import quantize_embeddings
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits + block + width)
    table = rng.standard_normal((37, width)).astype(np.float32)
    table[3] = 0.0
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["out"], name="g")], "lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, width])],
                              [numpy_helper.from_array(table, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (done,) = quantize_embeddings(model, bits, block)
    onnx.checker.check_model(model)
    assert not any(t.name == "emb" for t in model.graph.initializer)
    ids = rng.integers(0, 37, (2, 5))
    ids[0, 0], ids[1, 4] = 3, 36
    out = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    step_bits = done["bits"]
    assert step_bits == (8 if width % 2 else bits)
    blocks = -(-width // done["block_size"])
    padded = np.zeros((37, blocks * done["block_size"]), np.float32)
    padded[:, :width] = table
    levels = 127 if step_bits == 8 else 7
    step = np.abs(padded.reshape(37, blocks, -1)).max(axis=2) / levels
    bound = np.repeat(step, done["block_size"], axis=1)[:, :width] / 2
    assert out.shape == (2, 5, width)
    assert np.all(np.abs(out - table[ids]) <= bound[ids] * (1 + 1e-5) + 1e-7)
    assert np.all(out[0, 0] == 0.0)
    # The torch schemes' table (same layout, dequantized by editreward_quant.layers.embedding)
    # returns the same rows as ONNX Runtime.
    import torch
    from editreward_families.qwen2_5_vl.modeling import Decoder
    from editreward_quant.embedding import quantize_torch_embedding

    holder = Decoder.__new__(Decoder)  # the family's decoder, with nothing but its token table
    torch.nn.Module.__init__(holder)
    holder.set_token_embedding(torch.nn.Embedding.from_pretrained(torch.from_numpy(table)))
    assert quantize_torch_embedding(holder, bits, block)["bits"] == step_bits
    np.testing.assert_allclose(holder.token_embedding()(torch.from_numpy(ids)).numpy(), out, rtol=1e-6, atol=1e-7)


def test_graphs_over_the_protobuf_cap_use_external_data(tiny_onnx, quantized, triples, tmp_path, monkeypatch):
    """A 7B decoder is over 2 GB even at 4 bits: the quantized graph then goes to external data,
    is listed and hashed in the manifest, and scores exactly as the inline one does."""
    from editreward_quant import ort_schemes

    monkeypatch.setattr(ort_schemes, "EXTERNAL_DATA_BYTES", 1 << 12)
    out = quantize_exported(tiny_onnx, make_scheme("ort-int4"), tmp_path / "ext", log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "decoder.onnx.data").is_file() and "decoder.onnx.data" in manifest["files"]
    assert (out / "decoder.onnx").stat().st_size < 1 << 20
    assert weight_bytes(out) == weight_bytes(quantized["ort-int4"])
    inline, external = Scorer.load(quantized["ort-int4"]), Scorer.load(out)
    assert [s.mu for s in external.score_batch(triples[:2])] == [s.mu for s in inline.score_batch(triples[:2])]
    assert not list(tmp_path.glob(".*"))


def test_include_vision_quantizes_the_vision_graph(tiny_onnx, tmp_path, triples):
    """The vision tower's linear layers are Gemms on 2-D activations, which ONNX Runtime's weight
    quantizers skip: each group is handed over as MatMul + Add, so every one is quantized."""
    import onnx

    float_scores = Scorer.load(tiny_onnx).score_batch(triples)
    for name, op in (("ort-int8", "MatMulInteger"), ("ort-int4", "MatMulNBits")):
        out = quantize_exported(tiny_onnx, make_scheme(name, {"include_vision": "true"}), tmp_path / name, log=lambda *_: None)
        assert json.loads((out / "manifest.json").read_text())["quantization"]["graphs"] == ["decoder", "vision"]
        source = onnx.load(str(tiny_onnx / "vision.onnx"))
        weights = {t.name for t in source.graph.initializer}
        linears = [n for n in source.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in weights]
        vision = onnx.load(str(out / "vision.onnx"))
        assert sum(n.op_type == op for n in vision.graph.node) == len(linears) > 10
        assert not any(n.op_type == "Gemm" for n in vision.graph.node)
        tol = tolerance("onnxruntime", name)
        scores = Scorer.load(out).score_batch(triples)
        assert max(abs(a.mu - b.mu) for a, b in zip(scores, float_scores)) <= tol.mu


def test_configs_validate_and_serialise():
    assert set(SCHEMES) >= {"ort-int8", "ort-int4", "bnb-int8", "bnb-nf4", "gptq-int4", "trt-int8-sq", "trt-fp8", "trt-int4-awq"}
    scheme = make_scheme("ort-int4", {"block_size": "128", "accuracy_level": "0"})
    assert scheme.to_dict() == {"scheme": "ort-int4", "version": 3, "config": {
        "include_vision": False, "include_heads": False, "block_size": 128, "symmetric": True, "accuracy_level": 0,
        "embedding_bits": 8}}
    for bad in ({"block_size": "48"}, {"accuracy_level": "9"}, {"nonsense": "1"}, {"include_heads": "true"},
                {"embedding_bits": "3"}):
        with pytest.raises(QuantizeError):
            make_scheme("ort-int4", bad)
    with pytest.raises(QuantizeError, match="embedding_bits"):
        make_scheme("ort-int8", {"embedding_bits": "4"})
    with pytest.raises(QuantizeError, match="unknown scheme"):
        make_scheme("awq-int3")
    with pytest.raises(QuantizeError, match="version"):
        scheme_from_dict({"scheme": "ort-int8", "version": 7, "config": {}})


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(QuantizeError, match=r"editreward-deploy\[gptq\]"):
        check_available(make_scheme("gptq-int4"))


def test_scheme_without_its_library_says_so(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    code = quantize_main(["--ckpt", str(tiny.checkpoint), "--scheme", "trt-fp8", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "trt-fp8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_data(tmp_path, images):
    triples = synthetic_triples(3, seed=1)
    assert len(triples) == 3 and triples[0][1].dtype == np.uint8
    assert synthetic_triples(3, seed=1)[2][2].tobytes() == triples[2][2].tobytes()
    save(images[0], tmp_path, "a.png")
    save(images[1], tmp_path, "b.png")
    good = tmp_path / "calib.jsonl"
    good.write_text(json.dumps({"instruction": "x", "source": "a.png", "edited": "b.png"}) + "\n\n")
    assert load_triples(good)[0][1] == tmp_path / "a.png"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QuantizeError, match="no triples"):
        load_triples(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x"}\n')
    with pytest.raises(QuantizeError, match="broken.jsonl:1"):
        load_triples(broken)
    with pytest.raises(QuantizeError, match="cannot read"):
        load_triples(tmp_path / "missing.jsonl")
    with pytest.raises(QuantizeError, match="positive"):
        synthetic_triples(0)


def test_output_folder_guard(tiny_onnx, quantized, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ort-int8", "--out", str(other)]) == 2
    assert "already holds" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    # Re-quantizing the same source into its own earlier output replaces it.
    again = tmp_path / "again"
    shutil.copytree(quantized["ort-int8"], again)
    assert quantize_main(["--model-dir", str(tiny_onnx), "--scheme", "ort-int8", "--out", str(again)]) == 0
    assert not list(tmp_path.glob(".quantize-*"))


def test_quantized_input_is_refused(quantized, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_exported(quantized["ort-int8"], make_scheme("ort-int4"), tmp_path / "x", log=lambda *_: None)


@needs_bnb
def test_bnb_folder_needs_fast_mode(quantized):
    from editreward_rt.errors import BackendError

    with pytest.raises(BackendError, match="fast mode"):
        Scorer.load(quantized["bnb-int8"], mode="reference")


@needs_bnb
def test_size_report_counts_every_format_against_bf16(quantized, tiny_onnx, tmp_path, capsys):
    """One size figure for every scheme: a float32 export is exactly 2x bf16 (the parameter count
    is right), and torch folders count their quantized decoder tensors, embedding included."""
    from editreward_quant.sizes import decoder_weight_bytes
    from editreward_quant.sizes import main as sizes_main

    assert decoder_weight_bytes(tiny_onnx)["bf16_ratio"] == pytest.approx(2.0, abs=1e-3)
    ratios = {label: decoder_weight_bytes(folder)["bf16_ratio"] for label, folder in quantized.items()}
    # Tiny's matrices are so small that NF4's fixed tables (about 1.3 KB per layer) show, and its
    # embedding is a third of the decoder: bnb-nf4 with a 4-bit embedding is 0.37 here against
    # 0.26 on the small fixture.
    assert ratios["bnb-int8"] <= 0.56 and ratios["bnb-nf4-4"] <= 0.40 and ratios["bnb-nf4"] <= 0.45, ratios
    assert ratios["ort-int8"] <= 0.56 and ratios["ort-int4-4-32"] <= 0.33, ratios
    assert sizes_main([str(tiny_onnx), str(quantized["bnb-nf4"]), "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["format"] for r in rows] == ["onnx", "torch"] and rows[1]["scheme"] == "bnb-nf4"
    assert "x bf16" in capsys.readouterr().out


def _nf4_blocksizes(folder) -> set[int]:
    scorer = Scorer.load(folder)
    decoder = scorer.backend.graphs.decoder
    return {m.weight.quant_state.blocksize for m in decoder.modules() if type(m).__name__ == "Linear4bit"}


@needs_bnb
def test_nf4_block_size_reaches_bitsandbytes(tiny, quantized, tmp_path):
    out = tmp_path / "nf4-128"
    assert quantize_main(["--scheme", "bnb-nf4", "--option", "block_size=128", "--out", str(out),
                          "--ckpt", str(tiny.checkpoint), "--prompts-from", str(tiny.prompts)]) == 0
    assert _nf4_blocksizes(out) == {128}
    assert _nf4_blocksizes(quantized["bnb-nf4"]) == {64}


@needs_bnb
def test_a_quantized_folder_is_checked_against_its_scheme_when_opened(quantized, tmp_path):
    import shutil

    from editreward_rt.errors import ManifestError

    for label, change, message in (("ort-int8", {"version": 1}, f"version 1 is not {SCHEMES['ort-int8'].version}"),
                                   ("bnb-int8", {"config": {"threshold": 6.0, "frobnicate": True}}, "unknown options"),
                                   ("ort-int4", {"scheme": "ort-int3"}, "unknown scheme")):
        folder = tmp_path / label
        shutil.copytree(quantized[label], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["quantization"].update(change)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=message):
            Scorer.load(folder)


def test_default_int8_kernel_sums_exactly_on_this_cpu(quantized):
    """ort-int8's default numerics do not depend on the CPU: its MatMulInteger (uint8 activations x
    the default weights: int8 in [-64, 64]) must equal exact integer arithmetic on worst-case
    operands, the largest activations times the extreme weights. A kernel adding pairs of u8 x s8
    products in saturating 16-bit lanes (AVX2, AVX-512 without VNNI) is exact there only while
    2 * 255 * max|w| < 2**15, so the weights of the scheme's real graphs must keep that bound too."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    scheme = make_scheme("ort-int8")
    dtype, elem, zero = {"uint8": (np.uint8, TensorProto.UINT8, 128), "int8": (np.int8, TensorProto.INT8, 0)}[scheme.weight_type]
    low, high = (-64, 64) if scheme.reduce_range else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    if dtype is np.int8:
        assert 2 * 255 * max(-low, high) < 2**15  # the weights a saturating 16-bit pair sum can carry
    rng = np.random.default_rng(0)
    k, n = 512, 64
    b = np.where(rng.random((k, n)) < 0.5, high, low).astype(dtype)  # extreme weights...
    a = np.full((32, k), 255, np.uint8)  # ...times the largest activations: the saturating case
    a[::2] = rng.integers(0, 256, (16, k))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])], "exact",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", k])], [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.array(0, np.uint8), "a_zero"),
         numpy_helper.from_array(np.array(zero, dtype), "b_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ (b.astype(np.int64) - zero))

    decoder = onnx.load(str(quantized["ort-int8"] / "decoder.onnx"))
    weights = [t for t in decoder.graph.initializer if t.name in {n.input[1] for n in decoder.graph.node if n.op_type == "MatMulInteger"}]
    assert weights and {t.data_type for t in weights} == {elem}  # the scheme's graphs really carry weights of that type...
    stored = np.concatenate([numpy_helper.to_array(t).ravel().astype(np.int64) for t in weights])
    assert low <= stored.min() and stored.max() <= high  # ...within the range the exact case above covers


@needs_bnb
def test_a_torch_folder_whose_spec_does_not_fit_its_state_is_refused_at_once(quantized, tmp_path):
    import time

    from editreward_rt.errors import ManifestError

    for layers, message in ((100_000, "at most 1024"), (3, "saved state holds 2")):
        folder = tmp_path / f"int8-{layers}"
        shutil.copytree(quantized["bnb-int8"], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["spec"]["text"]["num_layers"] = layers
        (folder / "manifest.json").write_text(json.dumps(manifest))
        start = time.perf_counter()
        with pytest.raises(ManifestError, match=message):
            Scorer.load(folder)
        assert time.perf_counter() - start < 2.0
