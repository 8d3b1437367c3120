"""The GPU transports (nccl, ipc) into `align-serve --engine vllm` on CUDA, trainer and server on one GPU.

After each push the server's greedy output must be the trainer's own (float32 on both sides: vLLM's
auto dtype on a GPU is bfloat16), twice per transport, the second push reusing the open transfer
group. A sender killed between `start` and `update` leaves the server not ready (part of the live
model may be written) until a later full sync lands, as README's weight-sync section says.

Needs a CUDA device and the `gpu` extra: `make test-gpu` or scripts/gpu_run.sh; `make test` leaves
these out (marker `gpu`).
"""

import os
import subprocess
import sys

import httpx
import pytest

from tests.test_weights import KEY, Trainer, served
from tests.utils import ServerProcess, wait_for
from trainer_client import AlignClient

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

SESSION_TIMEOUT = 5.0  # the killed sender's session idles out after this

# A sender that pushes over `transport` and stalls after the server started the update (the live
# model is held, nothing received yet), so it can be killed at that point every time.
STALLING_SENDER = """
import sys, time, torch
from transformers import AutoModelForImageTextToText
from trainer_client import AlignClient
from trainer_client import weights
url, key, model_dir, transport, session_timeout = sys.argv[1:6]
model = AutoModelForImageTextToText.from_pretrained(model_dir).to("cuda")
def stall(self, update_info):
    print("STARTED", flush=True)
    time.sleep(3600)
weights._ServerSyncClient.update_weights = stall
AlignClient(url, api_key=key).push_weights(model, transport=transport, session_timeout_s=float(session_timeout))
"""


@pytest.fixture(scope="module")
def setup(tiny_vlm, log_dir):
    # ipc: the CUDA IPC handles cross our HTTP route pickled, which vLLM's worker accepts only with
    # this set. A third of the GPU for vLLM leaves the trainer room on the same device.
    server = ServerProcess(tiny_vlm, "vllm", api_key=KEY, extra=["--dtype", "float32", "--gpu-memory-utilization", "0.3"],
                           log_dir=log_dir, env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
    try:
        server.wait_ready(timeout=600)
        with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.2) as client:
            yield server, client, Trainer(tiny_vlm)
    finally:
        server.stop()


def _cuda_weights(trainer: Trainer) -> dict:
    return {n: p.detach().to("cuda") for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("transport", ["nccl", "ipc"])
def test_each_gpu_transport_serves_the_trainers_greedy_output(setup, transport):
    server, client, trainer = setup
    for seed in (1, 2):  # the second push reuses the transfer group the first opened
        before, version = served(client, trainer)
        expected = trainer.perturb_until_changed(seed + 10 * len(transport), before)
        new = client.push_weights(_cuda_weights(trainer), transport=transport)
        assert new == version + 1
        assert served(client, trainer) == (expected, new)


def test_an_nccl_sender_killed_mid_sync_leaves_the_server_not_ready_until_a_full_sync(setup, tiny_vlm):
    server, client, trainer = setup
    proc = subprocess.Popen([sys.executable, "-c", STALLING_SENDER, server.url, KEY, str(tiny_vlm), "nccl",
                             str(SESSION_TIMEOUT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        output = []
        while not (output and output[-1].startswith("STARTED")):
            output.append(proc.stdout.readline())
            assert output[-1], "the sender exited before the update:\n" + "".join(output)
    finally:
        proc.kill()
        proc.wait()
    with httpx.Client(headers=server.headers(), timeout=10) as http:
        assert http.get(f"{server.url}/ready").status_code == 503
        assert http.get(f"{server.url}/health").status_code == 200  # alive, only not ready
        # the dead sender's session idles out; /ready stays 503 after it
        wait_for(lambda: not http.get(f"{server.url}/v1/weights/version").json()["syncing"],
                 "the dead sender's session to expire", timeout=SESSION_TIMEOUT + 30)
        assert http.get(f"{server.url}/ready").status_code == 503
        before = trainer.greedy()
        expected = trainer.perturb_until_changed(7, before)
        new = client.push_weights(_cuda_weights(trainer), transport="nccl")
        assert http.get(f"{server.url}/ready").status_code == 200
    assert served(client, trainer) == (expected, new)
