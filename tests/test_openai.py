"""The OpenAI dialect with vLLM's extensions, on both engines: tools and tool calls, token ids,
top logprobs, /v1/completions, images by reference, streaming, refused fields; driven by the
`openai` package and by TRL's own `VLLMClient`, as agent and RL frameworks drive it."""

import base64
import json

import httpx
import pytest

from protocol import image_sha256
from runtime.torchvision_compat import load_processor
from tests.tool_model import CALL, IMAGE_SEED, QUESTION, TOOLS, question
from tests.utils import ServerProcess, png_bytes, random_image, wait_for

LIMITS = ["--max-model-len", "1024"]


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, tool_vlm, log_dir):
    # No API key: TRL's VLLMClient sends none (as against `vllm serve`).
    proc = ServerProcess(tool_vlm, request.param, extra=LIMITS, log_dir=log_dir).wait_ready(600)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def processor(tool_vlm):
    return load_processor(tool_vlm)


@pytest.fixture
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def _user_turn(url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": QUESTION}]}


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def _template_ids(processor, messages, tools=None) -> list[int]:
    ids = processor.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_tool_call_round_trip_with_a_tool_image(server, oai, processor):
    """Turn 1: the model's call is parsed into tool_calls. Turn 2: that assistant message and a tool
    message holding text and an image render exactly as the processor's template renders them."""
    first = [_user_turn(_data_url(random_image(IMAGE_SEED)))]
    resp = oai.chat.completions.create(model=oai.models.list().data[0].id, messages=first, tools=TOOLS,
                                       temperature=0, max_tokens=100, extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "zoom"
    assert json.loads(call.function.arguments) == {"factor": 2}
    assert resp.model_extra["prompt_token_ids"] == _template_ids(processor, question(), TOOLS)

    tool_image = random_image(42)
    second = [*first, choice.message,
              {"role": "tool", "tool_call_id": call.id, "content": [
                  {"type": "text", "text": "Zoomed in:"}, {"type": "image_url", "image_url": {"url": _data_url(tool_image)}}]}]
    resp2 = oai.chat.completions.create(model=resp.model, messages=second, tools=TOOLS, temperature=0, max_tokens=4,
                                        extra_body={"return_token_ids": True})
    expected = [*question(),
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": "zoom", "arguments": {"factor": 2}}}]},
                {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "Zoomed in:"},
                                                                      {"type": "image"}]}]
    ids = resp2.model_extra["prompt_token_ids"]
    assert ids == _template_ids(processor, expected, TOOLS)
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2  # one per image
    assert resp2.choices[0].model_extra["weight_version"] == 0


def test_images_named_by_sha256_once_the_server_holds_them(server):
    img = random_image(IMAGE_SEED)
    sha = image_sha256(png_bytes(img))
    body = {"tools": TOOLS, "temperature": 0, "max_tokens": 8, "return_token_ids": True}
    by_data = _post(server, "/v1/chat/completions", {**body, "messages": [_user_turn(_data_url(img))]}).json()
    by_ref = _post(server, "/v1/chat/completions", {**body, "messages": [_user_turn(f"sha256:{sha}")]}).json()
    assert by_ref["prompt_token_ids"] == by_data["prompt_token_ids"]
    assert by_ref["choices"][0]["token_ids"] == by_data["choices"][0]["token_ids"]
    r = _post(server, "/v1/chat/completions", {**body, "messages": [_user_turn("sha256:" + "e" * 64)]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_image"
    assert "messages[0].content[0].image_url.url" in r.json()["error"]["message"]


def test_top_logprobs_are_k_real_alternatives(server):
    r = _post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 6, "logprobs": True,
        "top_logprobs": 3, "return_token_ids": True, "return_tokens_as_token_ids": True}).json()
    choice = r["choices"][0]
    steps = choice["logprobs"]["content"]
    assert len(steps) == len(choice["token_ids"]) > 0
    for step, token_id in zip(steps, choice["token_ids"], strict=True):
        assert step["token"] == f"token_id:{token_id}"
        tops = step["top_logprobs"]
        assert len(tops) == 3 and len({t["token"] for t in tops}) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == step["token"]  # greedy: the sampled token is the most likely one
        assert tops[0]["logprob"] == pytest.approx(step["logprob"], abs=1e-5)
    own = _post(server, "/v1/generate", {"prompts": [{"prompt_ids": r["prompt_token_ids"]}],
                                         "sampling": {"temperature": 0, "max_tokens": 6, "top_logprobs": 3}})
    completion = own.json()["results"][0]["completions"][0]
    assert completion["token_ids"] == choice["token_ids"]
    assert [[t for t, _ in step] for step in completion["top_logprobs"]] == \
        [[int(t["token"].removeprefix("token_id:")) for t in step["top_logprobs"]] for step in steps]


def test_completions_route_orders_choices_prompt_by_prompt(server, processor):
    prompts = [[*processor.tokenizer.encode("Hello, how are you?")], [*processor.tokenizer.encode("The answer is")]]
    r = _post(server, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 1.0,
                                          "seed": 3, "logprobs": 2, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in choices] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    for c in choices:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(c["token_ids"]) > 0
        assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])  # the sampled token and the 2 best
    text = _post(server, "/v1/completions", {"prompt": "Hello, how are you?", "max_tokens": 5, "temperature": 0,
                                             "return_token_ids": True}).json()["choices"][0]
    assert text["prompt_token_ids"] == prompts[0]


def test_continuing_from_token_ids_on_completions_equals_the_chat_route(server):
    """An agent loop that keeps the sampled ids and appends the next turn's ids gets what the chat
    route gives for the same conversation."""
    chat = [{"role": "user", "content": "What colour is the shape? Use the zoom tool."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "zoom", "arguments": '{"factor": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "The shape is red."}]
    body = {"temperature": 0, "max_tokens": 8, "return_token_ids": True, "tools": TOOLS, "tool_choice": "none"}
    by_chat = _post(server, "/v1/chat/completions", {**body, "messages": chat}).json()
    ids = by_chat["prompt_token_ids"]
    by_ids = _post(server, "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 8,
                                               "return_token_ids": True}).json()
    assert by_ids["choices"][0]["prompt_token_ids"] == ids
    assert by_ids["choices"][0]["token_ids"] == by_chat["choices"][0]["token_ids"]


def test_streaming_sends_the_same_completion_in_chunks(server, oai):
    messages = [_user_turn(_data_url(random_image(IMAGE_SEED)))]
    kwargs = dict(model=oai.models.list().data[0].id, temperature=0, max_tokens=12,
                  extra_body={"return_token_ids": True})
    plain = oai.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], **kwargs)
    stream = oai.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], stream=True,
                                         stream_options={"include_usage": True}, logprobs=True, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    token_ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert text == plain.choices[0].message.content
    assert token_ids == plain.choices[0].model_extra["token_ids"]
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == len(token_ids)
    assert chunks[-1].usage.completion_tokens == len(token_ids) and not chunks[-1].choices
    assert chunks[0].model_extra["prompt_token_ids"] == plain.model_extra["prompt_token_ids"]
    calls = list(oai.chat.completions.create(messages=messages, tools=TOOLS, stream=True, **{**kwargs, "max_tokens": 100}))
    deltas = [tc for c in calls if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["zoom"]
    assert calls[-1].choices[0].finish_reason == "tool_calls"


def test_a_client_hanging_up_mid_stream_leaves_the_server_serving(server):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 900, "temperature": 1.0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"

    def idle():  # the metrics request itself is the one request in flight
        text = httpx.get(f"{server.url}/metrics").text
        return any(line == "align_inflight_requests 1.0" for line in text.splitlines())

    wait_for(idle, "the abandoned stream to end", timeout=120)
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
    assert r.status_code == 200 and server.alive()


REFUSED = [("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("logit_bias", {"5": 10}), ("best_of", 2),
           ("min_tokens", 3), ("ignore_eos", True), ("response_format", {"type": "json_object"}),
           ("structured_outputs", {"regex": "a+"}), ("guided_json", {"type": "object"}), ("prompt_logprobs", 1),
           ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "zoom"}}),
           ("no_such_field", 1)]


def test_every_refused_field_gets_a_422_naming_it_and_inert_fields_pass(server):
    base = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "tools": TOOLS}
    for field, value in REFUSED:
        r = _post(server, "/v1/chat/completions", {**base, field: value})
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["message"].startswith(f"{field}:"), (field, r.text)
    for field, value in [("echo", True), ("suffix", "x"), ("logit_bias", {"1": 1.0})]:
        r = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, field: value})
        assert r.status_code == 422 and field in r.json()["error"]["message"], (field, r.text)
    inert = {"user": "u1", "metadata": {"run": "7"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
             "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}}
    r = _post(server, "/v1/chat/completions", {**base, **inert})
    assert r.status_code == 200, r.text
    spec = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    props = spec["ChatCompletionRequest"]["properties"]
    assert {"presence_penalty", "logit_bias", "response_format", "user", "tools", "top_logprobs"} <= props.keys()
    assert (props["top_logprobs"]["anyOf"][0]["minimum"], props["top_logprobs"]["anyOf"][0]["maximum"]) == (0, 20)
    assert "refused" in props["presence_penalty"]["description"]


def test_trl_vllm_client_chat_and_generate_match_align_serves_own_generate(server, processor):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=server.url)
    img = random_image(IMAGE_SEED)
    out = client.chat([[{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": QUESTION}]}]],
                      tools=TOOLS, temperature=0.0, max_tokens=100, logprobs=2)
    own = _post(server, "/v1/generate", {"prompts": [{"prompt_ids": out["prompt_ids"][0], "images": [
        {"data": base64.b64encode(png_bytes(img)).decode()}]}], "sampling": {"temperature": 0, "max_tokens": 100}})
    assert out["completion_ids"][0] == own.json()["results"][0]["completions"][0]["token_ids"]
    assert processor.tokenizer.decode(out["completion_ids"][0], skip_special_tokens=True) == CALL
    assert [len(step) for step in out["logprob_token_ids"][0]] == [2] * len(out["completion_ids"][0])

    text = client.generate(["Hello, how are you?"], temperature=0.0, max_tokens=8)
    ids = processor.tokenizer.encode("Hello, how are you?")
    own = _post(server, "/v1/generate", {"prompts": [{"prompt_ids": ids}], "sampling": {"temperature": 0, "max_tokens": 8}})
    assert text["prompt_ids"] == [ids]
    assert text["completion_ids"][0] == own.json()["results"][0]["completions"][0]["token_ids"]


def test_chat_template_file_gives_tools_to_a_model_whose_template_has_none(tiny_vlm, log_dir, tmp_path):
    """The tiny Qwen2-VL keeps Qwen2-VL's stock template, which cannot render tools (as the real
    one cannot); `--chat-template FILE` serves it with a tool-capable one. Route logic only: one
    engine is enough."""
    from examples.tiny_model import CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE

    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_CHAT_TEMPLATE)
    server = ServerProcess(tiny_vlm, "transformers", extra=["--chat-template", str(template)],
                           log_dir=log_dir).wait_ready(600)
    try:
        tok = load_processor(tiny_vlm).tokenizer
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(random_image(3))}}, {"type": "text", "text": QUESTION}]}]
        body = {"messages": messages, "tools": TOOLS, "max_tokens": 2, "return_token_ids": True,
                "chat_template_kwargs": {"add_vision_id": True}}
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        expected = tok.apply_chat_template(question(), tools=TOOLS, chat_template=TOOLS_CHAT_TEMPLATE,
                                           add_generation_prompt=True, add_vision_id=True)
        assert r.json()["prompt_token_ids"] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert "Picture 1: " in tok.decode(r.json()["prompt_token_ids"])
        stock = _post(server, "/v1/chat/completions", {**body, "chat_template": CHAT_TEMPLATE})
        assert stock.status_code == 400, stock.text
        err = stock.json()["error"]
        assert "the request's chat_template cannot render tools" in err["message"] and "--chat-template" in err["message"]
        bad = _post(server, "/v1/chat/completions", {**body, "chat_template_kwargs": {"tools": []}})
        assert bad.status_code == 400 and "chat_template_kwargs" in bad.json()["error"]["message"]
    finally:
        server.stop()
