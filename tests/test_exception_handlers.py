"""How a request pydantic refuses becomes the 422 envelope (server/exception_handlers.py), on its own:
the field path it names, and the allowed range it quotes from the models' own JSON schema."""

import asyncio
import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from protocol import CompletionRequest, GenerateRequest, SamplingParams
from server.exception_handlers import field_path, ranges, validation_error


def _envelope(model, body: dict) -> tuple[int, dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    response = asyncio.run(validation_error(None, RequestValidationError(errors)))
    return response.status_code, json.loads(response.body)["error"]


def test_field_paths_leave_out_the_union_members_pydantic_names():
    assert field_path(("body", "prompts", 0, "images", 1, "sha256")) == "prompts[0].images[1].sha256"
    loc = ("body", "messages", 0, "content", "list[union[OpenAITextPart,OpenAIImagePart]]", 0, "OpenAITextPart", "text")
    assert field_path(loc) == "messages[0].content[0].text"
    assert field_path(("body",)) == "body"


def test_ranges_are_read_from_the_schema_with_open_and_closed_ends():
    got = ranges(SamplingParams)
    assert got["temperature"] == "[0.0, 2.0]" and got["top_p"] == "(0.0, 1.0]"
    assert "stop" not in got  # unbounded fields have no range


def test_a_bound_is_refused_naming_field_and_range():
    status, error = _envelope(GenerateRequest, {"prompts": [{"prompt_ids": [1]}], "sampling": {"top_p": 0}})
    assert (status, error["code"]) == (422, "invalid_request")
    assert error["message"] == "sampling.top_p: Input should be greater than 0 (allowed range (0.0, 1.0])"
    assert error["detail"][0]["range"] == "(0.0, 1.0]" and error["detail"][0]["limit"] == {"gt": 0.0}


def test_the_most_telling_error_of_a_union_comes_first():
    status, error = _envelope(CompletionRequest, {"prompt": "x", "stop": [""]})
    # pydantic names the string member's type error first; the list member's says what is wrong
    assert (status, error["message"]) == (422, "stop[0]: String should have at least 1 character")
    assert [d["field"] for d in error["detail"]] == ["stop[0]", "stop"]
