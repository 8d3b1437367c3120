"""Completions never contain the image/video placeholder tokens, on either engine.

With the output layer zeroed every token is equally likely, so thousands of sampled tokens would
hold several placeholders if the server let the model sample them.
"""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from examples.tiny_model import build
from tests.utils import ServerProcess, random_image
from trainer_client import AlignClient


@pytest.fixture(scope="module")
def uniform_vlm(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("uniform_vlm"), "qwen2_vl", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_placeholders_are_never_sampled(uniform_vlm, log_dir, engine):
    vocab_size = AutoConfig.from_pretrained(uniform_vlm).get_text_config().vocab_size
    server = ServerProcess(uniform_vlm, engine, log_dir=log_dir).wait_ready(600)
    try:
        with AlignClient(server.url) as client:
            info = client.info()
            messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]]
            out = client.generate(messages=messages * 8, images=[[random_image(k)] for k in range(8)],
                                  n=8, temperature=1.0, max_tokens=64)
        tokens = [t for r in out.results for c in r.completions for t in c.token_ids]
        assert len(tokens) > 2000 and len(set(tokens)) > 300  # uniform sampling really happened
        assert info.image_token_id not in tokens
        # all logits are 0 and the two placeholders (image, video) are removed: every sampled
        # token's processed logprob is log(1 / (V - 2))
        lps = [lp for r in out.results for c in r.completions for lp in c.logprobs]
        assert min(lps) == pytest.approx(-math.log(vocab_size - 2), abs=1e-4)
        assert max(lps) == pytest.approx(-math.log(vocab_size - 2), abs=1e-4)
    finally:
        server.stop()
