"""The OpenAI routes' helpers on their own (server/openai_requests.py, server/openai_responses.py):
messages into the HF form and prompt ids, completions into OpenAI's bodies. The tiny VLM's tokenizer
and chat templates; the routes themselves are in test_openai.py."""

import json
import math

import pytest

from examples.tiny_model import TOOLS_CHAT_TEMPLATE
from protocol import ChatCompletionRequest, CompletionRequest, ErrorCode, image_sha256
from server.config import ServeConfig
from server.engines import EngineCompletion
from server.engines.processing import ModelProcessing
from server.errors import APIError
from server.images import ImageCache
from server.openai_requests import check_model, hf_messages, image_ref, render, sampling_params
from server.openai_responses import (
    MIN_LOGPROB,
    chat_logprobs,
    joined,
    legacy_logprobs,
    message_of,
    text_pieces,
)
from tests.utils import random_image

SHA = image_sha256(b"held")
CALL = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'
ZOOM = {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def processing(tiny_vlm) -> ModelProcessing:
    return ModelProcessing(str(tiny_vlm))


@pytest.fixture(scope="module")
def text_processing(tiny_text) -> ModelProcessing:
    return ModelProcessing(str(tiny_text))


@pytest.fixture
def cache() -> ImageCache:
    cache = ImageCache(1024**2)
    cache.put(SHA, random_image(0, 8))
    return cache


def _chat(*messages, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=list(messages), **fields)


def _refusal(call) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    return info.value


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_hf_messages_carry_roles_images_tool_calls_and_names(cache):
    req = _chat({"role": "developer", "content": "be brief"},
                {"role": "user", "content": [_image("data:image/png;base64,AAAA"), {"type": "text", "text": "and"},
                                             _image(f"sha256:{SHA}")]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "zoom",
                                                                               "arguments": '{"factor": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "zoom", "content": "zoomed"})
    messages, refs = hf_messages(req, cache)
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": {"factor": 2}}}]},
        {"role": "tool", "content": "zoomed", "tool_call_id": "c1", "name": "zoom"},
    ]
    assert refs == [{"data": "AAAA"}, {"sha256": SHA}]


@pytest.mark.parametrize("arguments", ['{"factor": ', '[2]'])
def test_tool_call_arguments_must_be_a_json_object(cache, arguments):
    req = _chat({"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "zoom", "arguments": "{}"}},
                                                     {"id": "c2", "function": {"name": "zoom",
                                                                               "arguments": arguments}}]})
    err = _refusal(lambda: hf_messages(req, cache))
    field = "messages[1].tool_calls[1].function.arguments"
    assert (err.status, err.message, err.detail) == (400, f"{field} must be a JSON object in a string",
                                                     {"field": field})


def test_image_urls_the_server_cannot_take_are_named(cache):
    err = _refusal(lambda: image_ref("https://example.com/a.png", "f", cache))
    assert (err.code, err.detail) == (ErrorCode.invalid_image, {"field": "f"})
    assert "fetches nothing from the network" in err.message
    err = _refusal(lambda: image_ref("sha256:ABC", "f", cache))
    assert (err.code, err.detail) == (ErrorCode.invalid_image, {"field": "f"})
    unknown = "0" * 64
    err = _refusal(lambda: image_ref(f"sha256:{unknown}", "f", cache))
    assert (err.code, err.detail) == (ErrorCode.unknown_image, {"field": "f", "sha256": unknown})
    assert image_ref(f"sha256:{SHA}", "f", cache) == {"sha256": SHA}


def test_render_uses_the_request_template_then_the_servers_then_the_models(processing):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    req = _chat({"role": "user", "content": "unused here"})
    model_ids = processing.chat_prompt_ids(messages)
    assert render(processing, ServeConfig(model_name="m"), req, messages, 1) == model_ids
    flag = ServeConfig(model_name="m", chat_template="{% for m in messages %}<|image_pad|>{% endfor %}")
    assert render(processing, flag, req, messages, 1) == [processing.image_token_id]
    own = _chat({"role": "user", "content": "x"}, chat_template="<|image_pad|><|image_pad|>")
    err = _refusal(lambda: render(processing, flag, own, messages, 1))
    assert err.detail == {"field": "messages", "template": "the request's chat_template"}
    assert "rendered 2 image placeholders for the 1 images" in err.message


def test_render_refuses_what_the_template_cannot_render(processing, text_processing):
    config = ServeConfig(model_name="m")
    messages = [{"role": "user", "content": "hi"}]
    err = _refusal(lambda: render(processing, config, _chat(*messages, tools=[ZOOM]), messages, 0))
    assert err.detail == {"field": "tools", "template": "the chat template of m"}
    with_calls = [*messages, {"role": "assistant", "content": "", "tool_calls": []}]
    err = _refusal(lambda: render(processing, config, _chat(*messages), with_calls, 0))
    assert err.detail == {"field": "messages", "template": "the chat template of m"}
    tools = _chat(*messages, tools=[ZOOM], chat_template=TOOLS_CHAT_TEMPLATE)
    assert processing.tokenizer.decode(render(processing, config, tools, messages, 0)).count('"zoom"') == 1

    err = _refusal(lambda: render(processing, config, _chat(*messages, chat_template_kwargs={"tools": [], "x": 1,
                                                                                         "tokenize": 0}),
                                  messages, 0))
    assert err.message == "chat_template_kwargs may not set tokenize, tools: the request's own fields do"
    err = _refusal(lambda: render(processing, config, _chat(*messages, chat_template="{{ undefined() }}"), messages, 0))
    assert err.message.startswith("the request's chat_template failed on these messages: ")
    err = _refusal(lambda: render(text_processing, config, _chat(*messages), messages, 1))
    assert err.message == "messages hold images but the served model is text-only"


def test_sampling_params_and_the_served_model_name():
    req = CompletionRequest(prompt="x", stop="END", n=2, temperature=0.5, seed=3)
    params = sampling_params(req, 7, True, 2)
    assert (params.stop, params.n, params.temperature, params.seed, params.max_tokens) == (["END"], 2, 0.5, 3, 7)
    assert (params.logprobs, params.top_logprobs) == (True, 2)
    assert sampling_params(CompletionRequest(prompt="x"), 1, False, 0).stop == []
    check_model(None, "m")
    check_model("m", "m")
    err = _refusal(lambda: check_model("other", "m"))
    assert (err.status, err.code, err.detail) == (404, ErrorCode.not_found, {"field": "model"})


def _completion(tokenizer, text: str, **fields) -> EngineCompletion:
    ids = tokenizer.encode(text)
    return EngineCompletion(token_ids=ids, logprobs=fields.pop("logprobs", [-0.5] * len(ids)), text=text,
                            finish_reason="stop", weight_version=3, **fields)


def test_text_pieces_split_the_text_at_token_ends_and_join_to_it(processing):
    tokenizer = processing.tokenizer
    text = "red 🙂 blue"
    c = _completion(tokenizer, text)
    pieces = text_pieces(tokenizer, c)
    assert len(pieces) == len(c.token_ids) and "".join(pieces) == text
    # the emoji's bytes span several tokens: the ones before its last add nothing, the last the whole emoji
    emoji = pieces.index(next(p for p in pieces if "🙂" in p))
    assert pieces[emoji - 1] == "" and pieces[emoji].strip() == "🙂"


def test_joined_parts_are_one_completion(processing):
    tokenizer = processing.tokenizer
    a = _completion(tokenizer, "red", top_logprobs=[[(1, -0.1)]] * len(tokenizer.encode("red")))
    b = _completion(tokenizer, " blue", top_logprobs=[[(2, -0.2)]] * len(tokenizer.encode(" blue")))
    a.finish_reason, b.weight_version = None, 4
    whole = joined([a, b])
    assert whole.token_ids == a.token_ids + b.token_ids and whole.logprobs == a.logprobs + b.logprobs
    assert whole.top_logprobs == a.top_logprobs + b.top_logprobs
    assert (whole.text, whole.finish_reason, whole.weight_version) == ("red blue", "stop", 3)
    a.top_logprobs = b.top_logprobs = None
    assert joined([a, b]).top_logprobs is None


def test_logprobs_in_both_forms_clamp_minus_infinity(processing):
    tokenizer = processing.tokenizer
    ids = tokenizer.encode("red blue")
    c = _completion(tokenizer, "red blue", logprobs=[-math.inf] + [-0.25] * (len(ids) - 1),
                    top_logprobs=[[(ids[0], -0.1), (7, -math.inf)]] + [[]] * (len(ids) - 1))
    chat = chat_logprobs(tokenizer, c, as_ids=False)
    assert [e["token"] for e in chat] == [tokenizer.decode([t]) for t in ids]
    assert chat[0]["logprob"] == MIN_LOGPROB and chat[0]["bytes"] == list(chat[0]["token"].encode())
    assert [a["logprob"] for a in chat[0]["top_logprobs"]] == [-0.1, MIN_LOGPROB]
    assert chat_logprobs(tokenizer, c, as_ids=True)[0]["token"] == f"token_id:{ids[0]}"
    json.dumps(chat, allow_nan=False)  # what JSON cannot hold never reaches the body

    legacy = legacy_logprobs(tokenizer, c, as_ids=False)
    assert legacy["token_logprobs"][0] == MIN_LOGPROB
    assert "".join(legacy["tokens"]) == "red blue"
    assert legacy["text_offset"] == [sum(len(t) for t in legacy["tokens"][:i]) for i in range(len(ids))]
    first = legacy["tokens"][0]
    # the sampled token first, then the alternatives (the sampled one among them, with its own entry)
    assert legacy["top_logprobs"][0] == {first: -0.1, tokenizer.decode([7]): MIN_LOGPROB}


def test_tool_calls_are_parsed_only_when_tools_are_on(processing):
    c = _completion(processing.tokenizer, f"Looking. {CALL}")
    user = {"role": "user", "content": "hi"}
    content, calls, reason = message_of(_chat(user, tools=[ZOOM]), c)
    assert (content, reason) == ("Looking.", "tool_calls")
    assert [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls] == [("zoom", {"factor": 2})]
    assert message_of(_chat(user, tools=[ZOOM], tool_choice="none"), c) == (c.text, [], "stop")
    assert message_of(_chat(user), c) == (c.text, [], "stop")
