"""Weight sync against real `align-serve` subprocesses (transformers engine; vLLM in test_weights_vllm.py).

The trainer side is a real HF model in this process: after a push, the server's greedy output must be
exactly what that model's own `generate` gives, and every answer's `weight_version` must name the
weights that produced it.
"""

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server.engines import EnginePrompt
from server.engines.processing import ModelProcessing
from tests.utils import ServerProcess, random_image, wait_for
from trainer_client import AlignClient, AlignServerError
from trainer_client.weights import named_weights, plan_buckets

KEY = "weights-key"
MAX_TOKENS = 10
SMALL_BUCKET = 64 * 1024  # the tiny VLM (~0.9 MB) then spans a dozen buckets


class Trainer:
    """The training side: an HF model we perturb, and its own greedy answer to one image prompt."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.processing = ModelProcessing(str(model_dir))
        cls = AutoModelForImageTextToText if self.processing.is_vlm else AutoModelForCausalLM
        self.model = cls.from_pretrained(model_dir).eval()
        self.image = random_image(7) if self.processing.is_vlm else None
        self.images = [self.image] if self.image is not None else []
        content = [{"type": "image"}] if self.image is not None else []
        self.prompt_ids = self.processing.chat_prompt_ids([{"role": "user", "content": [
            *content, {"type": "text", "text": "What colour is the shape?"}]}])

    def perturb(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1.0))

    def perturb_until_changed(self, seed: int, tokens: list[int]) -> list[int]:
        """Perturb until the greedy answer differs from `tokens` (else a stale server would pass)."""
        for attempt in range(10):
            self.perturb(seed * 100 + attempt)
            expected = self.greedy()
            if expected != tokens:
                return expected
        raise AssertionError("ten perturbations left the greedy answer unchanged")

    def greedy(self, images: list | None = None) -> list[int]:
        """The model's own greedy answer to the prompt with `images` (default: its one image)."""
        images = self.images if images is None else images
        inputs = self.processing.model_inputs([EnginePrompt(self.prompt_ids, images)], "cpu")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, eos_token_id=self.processing.eos_token_ids,
                                      pad_token_id=self.processing.pad_token_id)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        for j, t in enumerate(tokens):
            if t in self.processing.eos_token_ids:
                return tokens[: j + 1]
        return tokens


def served(client: AlignClient, trainer: Trainer) -> tuple[list[int], int]:
    out = client.generate(prompt_ids=[trainer.prompt_ids], images=[trainer.images], temperature=0.0,
                          max_tokens=MAX_TOKENS)
    return out.results[0].completions[0].token_ids, out.weight_version


def version(client: AlignClient) -> int:
    return client._request(0, "GET", "/v1/weights/version").json()["weight_version"]


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    s = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def trainer(tiny_vlm):
    return Trainer(tiny_vlm)


@pytest.fixture
def client(server):
    with AlignClient(server.url, api_key=KEY, max_retries=2, backoff=0.1) as c:
        yield c


def test_bucket_plan_packs_tensors_and_splits_big_ones():
    pairs = [("a", torch.zeros(10)), ("b", torch.zeros(100)), ("c", torch.zeros(3, dtype=torch.bfloat16)),
             ("d", torch.zeros(1000))]
    specs, sizes = plan_buckets(pairs, bucket_bytes=512)
    assert [s.bucket for s in specs] == [0, 0, 1, 2]
    assert [s.offset for s in specs] == [0, 64, 0, 0]
    assert sizes == [464, 6, 4000]  # d (4000 bytes) is bigger than a bucket: a bucket of its own


def test_peft_model_pushes_merged_base_names(tiny_text):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_text)
    names = {n for n, _ in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    q = "model.layers.0.self_attn.q_proj.weight"
    unmerged = dict(base.named_parameters())["model.layers.0.self_attn.q_proj.base_layer.weight"].clone()
    with named_weights(model) as pairs:
        sent = dict(pairs)
        assert set(sent) == names
        assert not torch.equal(sent[q], unmerged)  # the adapter is folded in
    after = dict(base.named_parameters())["model.layers.0.self_attn.q_proj.base_layer.weight"]
    torch.testing.assert_close(after, unmerged)  # and unmerged again for training (up to rounding)


@pytest.mark.parametrize("transport", ["http", "tcp", "shm"])
def test_push_serves_the_trainers_greedy_output(client, trainer, transport):
    before_tokens, before = served(client, trainer)
    trainer.perturb(seed={"http": 1, "tcp": 2, "shm": 3}[transport])
    expected = trainer.greedy()
    assert expected != before_tokens, "the perturbation must change the greedy answer for this test to mean anything"
    new = client.push_weights(trainer.model, transport=transport, bucket_bytes=SMALL_BUCKET)
    assert new == before + 1
    tokens, tagged = served(client, trainer)
    assert tagged == new
    assert tokens == expected
    assert httpx.get(f"{client.base_urls[0]}/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_tcp_sync_listens_only_where_the_api_listens(client, server, trainer):
    """While a tcp sync is open, the server's TCPStore and gloo listen on the API's bind address
    (loopback here), never on every interface, and the sender's gloo the same."""
    import psutil

    def listening(pid: int) -> set[str]:
        return {c.laddr.ip for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    seen = {}

    def progress(sent: int, total: int) -> None:
        if sent < total and "server" not in seen:  # buckets still to come: the sync is open
            seen["server"], seen["trainer"] = listening(server.proc.pid), listening(os.getpid())

    version = client.push_weights(trainer.model, transport="tcp", bucket_bytes=SMALL_BUCKET, progress=progress)
    assert version == client.info(refresh=True).weight_version
    assert seen["server"] == {"127.0.0.1"}, seen
    assert seen["trainer"] <= {"127.0.0.1"}, seen


def test_weight_routes_require_the_api_key(server):
    for method, path in [("POST", "/v1/weights/init"), ("PUT", "/v1/weights/buckets/0"),
                         ("POST", "/v1/weights/commit"), ("POST", "/v1/weights/abort"),
                         ("GET", "/v1/weights/version"), ("POST", "/v1/weights/engine/start")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"


def _manifest(trainer: Trainer, bucket_bytes=SMALL_BUCKET):
    with named_weights(trainer.model) as pairs:
        specs, sizes = plan_buckets(pairs, bucket_bytes)
    return [s.model_dump(exclude_none=True) for s in specs], sizes


def test_bad_input_gets_a_4xx_naming_the_field_and_leaves_the_model_alone(server, client, trainer):
    tokens_before, v = served(client, trainer)
    h = server.headers()
    specs, sizes = _manifest(trainer)

    def init(**changes):
        body = {"transport": "http", "tensors": specs, "buckets": sizes, **changes}
        return httpx.post(f"{server.url}/v1/weights/init", json=body, headers=h)

    def expect(r, status, field):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        detail = err["detail"][0] if isinstance(err["detail"], list) else (err["detail"] or {})
        assert field in detail.get("field", "") or field in err["message"], err
        return err

    unknown = [dict(specs[0], name="model.no_such.weight"), *specs[1:]]
    expect(init(tensors=unknown), 422, "tensors[0].name")
    k = next(i for i, t in enumerate(specs) if len(t["shape"]) == 2 and t["shape"][0] != t["shape"][1])
    transposed = [*specs[:k], dict(specs[k], shape=specs[k]["shape"][::-1]), *specs[k + 1:]]  # same bytes
    expect(init(tensors=transposed), 422, f"tensors[{k}].shape")
    too_big = [dict(specs[0], shape=[d * 100 for d in specs[0]["shape"]]), *specs[1:]]  # past its bucket
    expect(init(tensors=too_big), 422, "tensors[0]")
    expect(init(tensors=specs[1:]), 422, "tensors")  # a sync carries the whole model
    out_of_range = [dict(specs[0], bucket=len(sizes)), *specs[1:]]
    expect(init(tensors=out_of_range), 422, "tensors[0].bucket")
    expect(init(transport="carrier-pigeon"), 422, "transport")
    expect(init(transport="nccl"), 400, "transport")  # the transformers engine has no vLLM transfer engines
    bad_json = httpx.post(f"{server.url}/v1/weights/init", content=b"{not json",
                          headers={**h, "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"

    r = init()
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    put = {**h, "X-Weights-Session": sid, "Content-Type": "application/octet-stream"}
    expect(httpx.put(f"{server.url}/v1/weights/buckets/{len(sizes)}", content=b"x", headers=put), 404, "index")
    expect(httpx.put(f"{server.url}/v1/weights/buckets/0", content=b"x" * (sizes[0] - 1), headers=put),
           400, "content-length")
    expect(httpx.put(f"{server.url}/v1/weights/buckets/0", content=b"x" * sizes[0],
                     headers={**put, "X-Weights-Session": "0" * 32}), 404, "session_id")
    assert httpx.put(f"{server.url}/v1/weights/buckets/0", content=b"\0" * sizes[0], headers=put).status_code == 200
    expect(httpx.post(f"{server.url}/v1/weights/commit", json={"session_id": sid}, headers=h), 409, "buckets")
    expect(httpx.post(f"{server.url}/v1/weights/commit", json={"session_id": sid, "extra": 1}, headers=h),
           422, "extra")
    assert httpx.post(f"{server.url}/v1/weights/abort", json={"session_id": sid}, headers=h).status_code == 200
    # Bucket 0 (zeros) was staged, never served:
    assert served(client, trainer) == (tokens_before, v)
    assert version(client) == v


def test_second_concurrent_sync_gets_409_and_abort_frees_the_server(server, client, trainer):
    specs, sizes = _manifest(trainer)
    body = {"transport": "http", "tensors": specs, "buckets": sizes}
    first = httpx.post(f"{server.url}/v1/weights/init", json=body, headers=server.headers())
    assert first.status_code == 200
    second = httpx.post(f"{server.url}/v1/weights/init", json=body, headers=server.headers())
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "conflict"
    with pytest.raises(AlignServerError) as info:
        client.push_weights(trainer.model, transport="http")
    assert info.value.status == 409
    httpx.post(f"{server.url}/v1/weights/abort", json={"session_id": first.json()["session_id"]},
               headers=server.headers()).raise_for_status()
    v = version(client)
    assert client.push_weights(trainer.model, transport="shm") == v + 1


SENDER = """
import sys, time, torch
from transformers import AutoModelForImageTextToText
from trainer_client import AlignClient
url, key, model_dir, transport, bucket_bytes, session_timeout = sys.argv[1:7]
model = AutoModelForImageTextToText.from_pretrained(model_dir)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(-1.0)
def stall(sent, total):
    print("SENT", sent, total, flush=True)
    time.sleep(3600)
AlignClient(url, api_key=key).push_weights(model, transport=transport, bucket_bytes=int(bucket_bytes),
                                            session_timeout_s=float(session_timeout), progress=stall)
"""
# tcp frees the server the moment the dead sender's socket closes, so its session may idle long
# (the status check below has all the time it needs); http and shm wait out the idle timeout.
SESSION_TIMEOUT = {"http": 5.0, "tcp": 60.0, "shm": 5.0}


def kill_sender_mid_stream(url: str, model_dir, transport: str) -> tuple[int, int]:
    """Start a sender of negated weights, SIGKILL it once it reports part of the model sent; (sent, total) bytes."""
    proc = subprocess.Popen([sys.executable, "-c", SENDER, url, KEY, str(model_dir), transport, str(SMALL_BUCKET),
                             str(SESSION_TIMEOUT[transport])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        output = []
        while not (output and output[-1].startswith("SENT")):
            output.append(proc.stdout.readline())
            assert output[-1], "the sender exited before its first bucket:\n" + "".join(output)
        sent, total = map(int, output[-1].split()[1:])
        assert 0 < sent < total  # killed with buckets still to come
        if transport != "shm":  # shm writes into the staging file directly: the server counts no buckets
            # The sender's gloo send can return before the server's receive thread records the
            # bucket: wait until the server itself reports it, with the sender still stalled.
            with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as http:  # one client for every poll
                status = wait_for(lambda: (s := http.get(f"{url}/v1/weights/version").json())["received_buckets"] and s,
                                  "the server to record a bucket")
            assert status["syncing"] and 0 < status["received_buckets"] < status["total_buckets"], status
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return sent, total


def push_when_free(client: AlignClient, weights, transport: str, deadline_s: float) -> int:
    """Push, retrying the 409 a dead sender's session answers until the server drops it."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.push_weights(weights, transport=transport, bucket_bytes=SMALL_BUCKET)
        except AlignServerError as exc:
            assert exc.status == 409 and time.monotonic() < deadline, exc
            time.sleep(0.2)


def check_sender_killed_mid_stream(server, client, trainer, model_dir, transport: str, seed: int) -> None:
    tokens_before, v = served(client, trainer)
    kill_sender_mid_stream(server.url, model_dir, transport)
    assert served(client, trainer) == (tokens_before, v)  # never a mixed model
    # A fresh sender gets through once the dead one's session fails (tcp) or idles out (http, shm).
    new_tokens = trainer.perturb_until_changed(seed, tokens_before)
    new = push_when_free(client, trainer.model, transport, SESSION_TIMEOUT[transport] + 30)
    assert new == v + 1
    assert served(client, trainer) == (new_tokens, new)


@pytest.mark.fault
@pytest.mark.parametrize("transport", ["http", "tcp", "shm"])
def test_sender_killed_mid_stream_leaves_the_old_version_serving(server, client, trainer, tiny_vlm, transport):
    check_sender_killed_mid_stream(server, client, trainer, tiny_vlm, transport, seed=11)


def test_generate_traffic_during_syncs_never_fails_and_each_answer_names_its_weights(client, trainer):
    check_traffic_during_syncs(client, trainer)


def check_traffic_during_syncs(client: AlignClient, trainer: Trainer) -> None:
    expected = {}
    tokens, v = served(client, trainer)
    expected[v] = tokens
    stop = threading.Event()
    answers, errors = [], []

    def traffic():
        with AlignClient(client.base_urls[0], api_key=KEY, max_retries=0) as c:
            while not stop.is_set():
                try:
                    out = c.generate(prompt_ids=[trainer.prompt_ids] * 3, images=[trainer.images] * 3,
                                     temperature=0.0, max_tokens=MAX_TOKENS)
                except Exception as exc:  # noqa: BLE001 - every failure is a test failure, collected
                    errors.append(exc)
                    continue
                per_completion = {c.weight_version for r in out.results for c in r.completions}
                answers.append((out.weight_version, per_completion, [r.completions[0].token_ids for r in out.results]))

    def wait_answers(version: int, count: int = 3) -> None:
        # Each version must be seen by the traffic before the next push: a condition, not a sleep.
        wait_for(lambda: errors or sum(1 for tagged, _, _ in list(answers) if tagged == version) >= count,
                 f"{count} answers at version {version}", timeout=300)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(traffic) for _ in range(3)]
        try:
            wait_answers(v)
            for seed, transport in [(21, "http"), (22, "tcp"), (23, "shm")]:
                new_tokens = trainer.perturb_until_changed(seed, expected[max(expected)])
                pushed = client.push_weights(trainer.model, transport=transport, bucket_bytes=SMALL_BUCKET)
                expected[pushed] = new_tokens
                wait_answers(pushed)
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert not errors, errors[:3]
    assert sorted(expected) == list(range(v, v + 4))
    seen = set()
    for tagged, per_completion, rows in answers:
        assert per_completion == {tagged}
        assert all(row == expected[tagged] for row in rows), f"version {tagged} answered with other weights"
        seen.add(tagged)
    assert seen == set(expected)  # the traffic really spanned every sync


def test_metrics_count_syncs(server, client):
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    assert 'align_weight_syncs_total{outcome="committed"}' in text
    assert f"align_weight_version {float(version(client))}" in text


def test_no_staging_file_outlives_its_server(tiny_vlm, trainer, log_dir):
    """/dev/shm is memory. A server stopped with SIGTERM removes the staging file it keeps between
    syncs as it shuts down; one killed with SIGKILL leaves it, and the next server on this host
    removes it when it starts."""
    from server.staging import STAGING_PREFIX, staging_root

    def files(server: ServerProcess) -> list:
        return sorted(staging_root().glob(f"{STAGING_PREFIX}{server.proc.pid}-*"))

    def started_and_pushed() -> ServerProcess:
        server = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir).wait_ready()
        with AlignClient(server.url, api_key=KEY) as c:
            c.push_weights(trainer.model, transport="http", bucket_bytes=SMALL_BUCKET)
        assert len(files(server)) == 1  # the committed sync's file, kept for the next sync
        return server

    stopped = started_and_pushed()
    stopped.stop()
    assert files(stopped) == []
    killed = started_and_pushed()
    killed.kill()
    assert len(files(killed)) == 1
    successor = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir).wait_ready()
    try:
        assert files(killed) == []
    finally:
        successor.stop()


OTHER_SHM_SENDER = """
import sys
from transformers import AutoModelForImageTextToText
from trainer_client import AlignClient
from trainer_client.weights import TransportError
url, key, model_dir = sys.argv[1:4]
try:
    AlignClient(url, api_key=key).push_weights(AutoModelForImageTextToText.from_pretrained(model_dir), transport="shm")
except TransportError as exc:
    print("REFUSED", exc, flush=True)
"""


def _can_unshare_mounts() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` (root) to give the sender its own /dev/shm")
def test_shm_to_a_server_behind_another_dev_shm_is_refused_in_one_line(server, client, trainer, tiny_vlm):
    """A sender whose /dev/shm is not the server's (a container without a shared IPC namespace)
    gets one line naming the way out, and the server is free for the next sync at once."""
    before = version(client)
    sender = ("mount -t tmpfs tmpfs /dev/shm && exec " + shlex.join(
        [sys.executable, "-c", OTHER_SHM_SENDER, server.url, KEY, str(tiny_vlm)]))
    run = subprocess.run(["unshare", "-m", "sh", "-c", sender], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REFUSED shm: the server's staging file" in run.stdout and "--weight-transport http or tcp" in run.stdout
    assert version(client) == before
    client.push_weights(trainer.model, transport="http", bucket_bytes=SMALL_BUCKET)  # not held by the refused one
    assert version(client) == before + 1
