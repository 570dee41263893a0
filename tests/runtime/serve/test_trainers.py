"""The trainers' own protocols on a live ``editreward serve`` (real loopback HTTP, tiny ONNX model),
on Ray Serve and in one process (``--single-process``): every test runs against each.

Each payload is built the way the trainer's client builds it (UniRL: ``requests`` with ``json=``,
base64 JPEG at quality 95 in a two-turn history; Edit-R1: ``pickle.dumps`` of JPEG bytes sent with
no content type through a session that retries HTTP 500 a thousand times), and every score is
checked against ``Scorer.score`` on the very bytes sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
import random

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the serve extra is not installed
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

from conftest import SERVING_MODES, random_image, serving  # noqa: E402

TIMEOUT = 60
TOKEN = "s3cret-token"
EDIT_R1 = "/mode/logits_non_cot"


def jpeg(image, quality: int | None = None) -> bytes:
    """What the clients send: UniRL saves JPEG at quality 95, Edit-R1 at PIL's default."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", **({"quality": quality} if quality else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources():
    return [random_image(500 + i, 56, 72) for i in range(2)]


@pytest.fixture(scope="module")
def edits():
    return [random_image(600 + i, 48 + 4 * i, 64) for i in range(8)]


@pytest.fixture(scope="module")
def local(tiny_onnx):
    from editreward_rt import Scorer

    return Scorer.load(tiny_onnx, threads=1)


@pytest.fixture(scope="module", params=SERVING_MODES)
def server(tiny_onnx, request):
    from editreward_rt.serve.app import ServeConfig
    from editreward_rt.serve.schemas import Limits

    limits = Limits(max_body_bytes=4 * 1024 * 1024, max_image_pixels=1_000_000, max_triples=16)
    open_app = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=8, batch_wait_ms=20, limits=limits)
    locked = ServeConfig(model=str(tiny_onnx), threads=1, max_batch=8, limits=limits, token=TOKEN)
    with serving({"editreward": ("/", open_app), "locked": ("/locked", locked)}, request.param) as url:
        yield url


def metric(server: str, line_start: str) -> float:
    text = requests.get(server + "/metrics", timeout=TIMEOUT).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


# ---------------------------------------------------------------- UniRL v1


def unirl_payload(instruction: str, pairs: list, **identity) -> dict:
    """``RemoteRewardBackend._build_score_payload`` for an editing batch: per sample a two-turn history
    of the condition (source) image and the generated image, base64 JPEG at quality 95."""
    b64 = lambda image: base64.b64encode(jpeg(image, 95)).decode("ascii")  # noqa: E731
    return {"requests": [{"history": [{"text": instruction, "image_b64": b64(src)},
                                      {"text": instruction, "image_b64": b64(edit)}],
                          "required_rewards": ["editreward"], "metadata": {"k": k},
                          **{name: f"{value}-{k}" for name, value in identity.items()}}
                         for k, (src, edit) in enumerate(pairs)]}


def unirl_post(server: str, payload: dict, path: str = "/score", **kw):
    """As the client posts: a session that ignores proxy variables, ``json=``, 300 s timeout."""
    session = requests.Session()
    session.trust_env = False
    return session.post(server + path, json=payload, timeout=300, **kw)


def reduce(sub_metrics: dict, how: str) -> float:
    """UniRL's ``_reduce_sub_metrics``."""
    values = list(sub_metrics.values())
    return {"first": values[0], "mean": sum(values) / len(values), "max": max(values)}[how]


def test_unirl_health_names_editreward(server, local):
    health = requests.get(server + "/health", timeout=TIMEOUT).json()
    assert health.get("status") == "ok", health
    assert health["rewards"] == {"editreward": ["overall", *local.spec.heads.names]}


def test_heads_are_sub_metrics_only_under_mean_fusion():
    """With min or sum fusion the heads' values would pull UniRL's "mean" reduction off mu."""
    from editreward_rt.serve.trainers import sub_metrics

    result = {"mu": 0.5, "heads": [{"name": "a", "mu": 1.0}, {"name": "b", "mu": 0.0}]}
    assert sub_metrics(result, with_heads=True) == {"overall": 0.5, "a": 1.0, "b": 0.0}
    assert sub_metrics(result, with_heads=False) == {"overall": 0.5}


def test_unirl_score_matches_in_process(server, sources, edits, local):
    pairs = [(sources[0], e) for e in edits] + [(sources[1], e) for e in edits[:4]]  # 8 edits of one source
    payload = unirl_payload("make the sky pink", pairs, request_id="r", sample_id="s", group_id="g",
                            idempotency_key="score-test")
    payload["protocol_version"] = "1"
    batches, triples = metric(server, "editreward_batch_size_count"), metric(server, "editreward_batch_size_sum")
    answer = unirl_post(server, payload)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["protocol_version"] == "1" and len(body["results"]) == len(pairs)
    assert body["errors"] == [{}] * len(pairs)
    assert body["identities"][3] == {"request_id": "r-3", "sample_id": "s-3", "group_id": "g-3",
                                     "idempotency_key": "score-test-3"}
    # Through the service's batcher (max_batch 8): 12 triples in fewer than 12 batches.
    assert metric(server, "editreward_batch_size_sum") - triples == len(pairs)
    assert metric(server, "editreward_batch_size_count") - batches < len(pairs)
    assert local.spec.heads.fusion == "mean"  # mu is the heads' mean, so "mean" of the sub-metrics is mu too
    for (src, edit), result in zip(pairs, body["results"]):
        want = local.score("make the sky pink", jpeg(src, 95), jpeg(edit, 95))
        got = result["editreward"]
        assert list(got) == ["overall", "instruction_following", "visual_quality"]
        assert got["instruction_following"] == pytest.approx(want.heads[0].mu, abs=1e-4)
        for how in ("first", "mean"):
            assert reduce(got, how) == pytest.approx(want.mu, abs=1e-4), how


def test_unirl_item_errors_stay_per_item(server, sources, edits, local):
    payload = unirl_payload("add a cat", [(sources[0], edits[0])] * 5)
    good = payload["requests"][0]
    payload["requests"][1]["history"][1]["image_b64"] = base64.b64encode(b"\xff\xd8 not a jpeg").decode()
    payload["requests"][2]["history"] = good["history"][:1]  # a text-to-image sample: no source
    payload["requests"][3]["required_rewards"] = ["editreward", "hpsv2"]
    payload["requests"][4]["history"][0]["text"] = "   "
    body = unirl_post(server, payload).json()
    want = local.score("add a cat", jpeg(sources[0], 95), jpeg(edits[0], 95)).mu
    assert body["results"][0]["editreward"]["overall"] == pytest.approx(want, abs=1e-4)
    assert body["results"][1] == {} and "image_error" in body["errors"][1]["editreward"]
    assert "history[1]" in body["errors"][1]["editreward"]
    assert body["results"][2] == {} and "two turns" in body["errors"][2]["editreward"]
    assert body["results"][3]["editreward"]["overall"] == pytest.approx(want, abs=1e-4)
    assert set(body["errors"][3]) == {"hpsv2"}
    assert body["results"][4] == {} and "instruction_error" in body["errors"][4]["editreward"]


def test_unirl_idempotency_key_replays_the_first_answer(server, sources, edits):
    payload = unirl_payload("brighten it", [(sources[1], e) for e in edits[:3]], idempotency_key="replay")
    first = unirl_post(server, payload).json()
    scored = metric(server, 'editreward_triples_total{outcome="scored"}')
    again = unirl_post(server, payload).json()
    assert again["results"] == first["results"]
    assert metric(server, 'editreward_triples_total{outcome="scored"}') == scored  # answered, not scored again
    payload["requests"][0]["history"][1]["image_b64"] = payload["requests"][1]["history"][1]["image_b64"]
    clash = unirl_post(server, payload).json()
    assert clash["results"][0] == {} and "another request" in clash["errors"][0]["editreward"]


def test_unirl_whole_request_errors_are_typed(server):
    for body, status in (({"requests": "nope"}, 422), ({"protocol_version": "2", "requests": []}, 422)):
        answer = unirl_post(server, body)
        assert answer.status_code == status and answer.json()["error"]["type"] == "invalid_request"
    answer = requests.post(server + "/score", data=b"{oops", timeout=TIMEOUT)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_json"
    assert unirl_post(server, {"requests": []}).json()["results"] == []


# ---------------------------------------------------------------- Edit-R1 (pickle)


def edit_r1_session():
    """``mllm_score_continue``'s session: HTTP 500 retried a thousand times."""
    from requests.adapters import HTTPAdapter, Retry

    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=1000, backoff_factor=1, status_forcelist=[500],
                                                           allowed_methods=False)))
    return session


def edit_r1_body(sources, edits, prompts, metadatas) -> bytes:
    """``mllm_score_continue``'s request: uint8 arrays -> PIL -> JPEG bytes at PIL's default quality."""
    from PIL import Image

    images = [jpeg(Image.fromarray(np.array(e))) for e in edits]
    refs = [jpeg(Image.fromarray(np.array(s))) for s in sources]
    return pickle.dumps({"ref_images": refs, "images": images, "prompts": prompts, "metadatas": metadatas})


def test_edit_r1_scores_match_in_process(server, sources, edits, local):
    refs = [sources[0]] * 4 + [sources[1]] * 4
    prompts = ["make it red"] * 4 + ["add a hat"] * 4
    body = edit_r1_body(refs, edits, prompts, [{"requirement": ""}] * 8)
    response = edit_r1_session().post(server + EDIT_R1, data=body, timeout=360)
    assert response.status_code == 200, response.text
    scores = pickle.loads(response.content)["scores"]
    for prompt, src, edit, got in zip(prompts, refs, edits, scores, strict=True):
        assert got == pytest.approx(local.score(prompt, jpeg(src), jpeg(edit)).mu, abs=1e-4)
    # Flow-GRPO's np.array_split leaves prompts as a numpy string array (and its items numpy str_).
    split = pickle.loads(body)
    split["prompts"] = np.array_split(np.array(prompts), 1)[0]
    again = edit_r1_session().post(server + EDIT_R1, data=pickle.dumps(split), timeout=360)
    assert pickle.loads(again.content)["scores"] == pytest.approx(scores, abs=1e-6)


def test_hostile_and_bad_pickles_get_one_typed_4xx(server, sources, edits, tmp_path):
    marker = tmp_path / "pwned"

    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    good = edit_r1_body(sources[:1], edits[:1], ["x"], [{}])
    cases = [
        (pickle.dumps(System()), 400, "pickle_refused"),
        (pickle.dumps({"ref_images": [System()], "images": [b"x"], "prompts": ["x"]}), 400, "pickle_refused"),
        (good[:-5], 400, "invalid_pickle"),
        (b"", 400, "invalid_pickle"),
        (pickle.dumps(["not", "a", "dict"]), 422, "invalid_request"),
        (pickle.dumps({"images": [b"x"], "prompts": ["x"], "metadata": {}}), 422, "invalid_request"),  # verl-omni's
        (pickle.dumps({"ref_images": [b"x"] * 2, "images": [b"x"], "prompts": ["x"]}), 422, "invalid_request"),
        (pickle.dumps({"ref_images": [b"x"], "images": [b"\xff\xd8 broken"], "prompts": ["x"]}), 422,
         "unscorable_items"),
        (pickle.dumps({"ref_images": [b"x"], "images": ["a/path.jpg"], "prompts": ["x"]}), 422, "invalid_request"),
    ]
    before = metric(server, 'editreward_requests_total{endpoint="edit_r1"')
    for body, status, kind in cases:
        response = edit_r1_session().post(server + EDIT_R1, data=body, timeout=360)
        assert response.status_code == status, (kind, response.text)
        assert response.json()["error"]["type"] == kind
    assert not marker.exists()
    # One HTTP request per case: the client's 500-retry loop never started.
    assert metric(server, 'editreward_requests_total{endpoint="edit_r1"') - before == len(cases)

    # Mangled bodies (truncations and flipped bytes of a valid one) are refused or scored, never a 5xx.
    rng = random.Random(0)
    for _ in range(40):
        mangled = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        mangled = bytes(mangled[: rng.randint(1, len(mangled))]) if rng.random() < 0.3 else bytes(mangled)
        assert requests.post(server + EDIT_R1, data=mangled, timeout=TIMEOUT).status_code < 500


# ---------------------------------------------------------------- the token


def test_token_guards_the_json_protocols(server, sources, edits):
    payload = unirl_payload("x", [(sources[0], edits[0])])
    assert unirl_post(server, payload, "/locked/score").status_code == 401
    assert unirl_post(server, payload, "/locked/score", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = unirl_post(server, payload, "/locked/score", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and "editreward" in ok.json()["results"][0]
    # UniRL sets no headers, but requests sends a base_url's credentials as HTTP Basic.
    basic = unirl_post(server.replace("http://", f"http://editreward:{TOKEN}@"), payload, "/locked/score")
    assert basic.status_code == 200 and "editreward" in basic.json()["results"][0]
    wrong = unirl_post(server.replace("http://", "http://editreward:nope@"), payload, "/locked/score")
    assert wrong.status_code == 401
    triple = {"instruction": "x", "source": payload["requests"][0]["history"][0]["image_b64"],
              "edited": payload["requests"][0]["history"][1]["image_b64"]}
    refused = requests.post(server + "/locked/v1/score", json=triple, timeout=TIMEOUT)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    assert requests.post(server + "/locked/v1/score", json=triple, timeout=TIMEOUT,
                         headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert requests.get(server + "/locked/health", timeout=TIMEOUT).status_code == 200  # probes stay open

    from editreward_rt.client import RewardClient
    from editreward_rt.errors import InputError

    source, edited = (base64.b64decode(triple[k]) for k in ("source", "edited"))
    assert RewardClient(server + "/locked", token=TOKEN).score("x", source, edited).mu == pytest.approx(
        ok.json()["results"][0]["editreward"]["overall"], abs=1e-6)
    with pytest.raises(InputError, match="Bearer"):
        RewardClient(server + "/locked", retries=0).score("x", source, edited)


# ---------------------------------------------------------------- the trainer adapters (RewardClient underneath)


def test_verl_omni_compute_score(server, sources, edits, local, tmp_path):
    from editreward_rt.adapters.verl_omni import compute_score
    from editreward_rt.errors import ImageError

    (tmp_path / "src.png").write_bytes(png := _png(sources[0]))
    arrays = [np.asarray(e, dtype=np.float32) / 255.0 for e in edits[:4]]  # verl-omni's [H, W, C] in [0, 1]
    infos = [{"source_img": {"bytes": png}}, {"image": "src.png"}, {"source_img": None, "image": "src.png"},
             {"source_img": {"bytes": png}}]

    async def all_samples():  # verl-omni gathers one call per sample
        return await asyncio.gather(*(compute_score(a, "add a hat", info, server_url=server, source_root=str(tmp_path),
                                                    data_source="uniimageedit") for a, info in zip(arrays, infos)))

    for got, array in zip(asyncio.run(all_samples()), arrays, strict=True):
        assert got["score"] == pytest.approx(local.score("add a hat", png, array).mu, abs=1e-4)
    with pytest.raises(ImageError, match="outside the source root"):
        asyncio.run(compute_score(arrays[0], "x", {"image": "../src.png"}, server_url=server,
                                  source_root=str(tmp_path / "sub")))


def test_flow_grpo_and_trl_reward_functions(server, sources, edits, local, monkeypatch):
    from editreward_rt.adapters import flow_grpo, trl

    monkeypatch.setenv("EDITREWARD_URL", server)
    stack = np.stack([np.asarray(e.resize((64, 48))) for e in edits[:4]])  # [B, H, W, C] uint8
    prompts = ["make it red", "make it red", "add a hat", "add a hat"]
    refs = [sources[0], sources[0], sources[1], sources[1]]
    want = [local.score(p, r, e).mu for p, r, e in zip(prompts, refs, stack)]
    scores, info = flow_grpo.editreward_score("cuda")(stack, prompts, [{}] * 4, ref_images=refs)
    assert scores == pytest.approx(want, abs=1e-4) and info["errors"] == {}
    by_metadata, _ = flow_grpo.editreward_score(url=server)(stack, prompts, [{"source": _png(r)} for r in refs])
    assert by_metadata == pytest.approx(want, abs=1e-4)

    rewards = asyncio.run(trl.editreward(prompts=prompts, completions=list(stack), source=[_png(r) for r in refs]))
    assert rewards == pytest.approx(want, abs=1e-4)
    broken = asyncio.run(trl.editreward(prompts=prompts[:1], completions=[stack[0]], source=[b"\x89PNG broken"]))
    assert broken == [None]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
