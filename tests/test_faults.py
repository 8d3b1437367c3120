"""The fault suite: load, stalled peers and floods against a real `align-serve` (transformers engine).

What each test proves is that nothing is lost: every request is answered (a 503 during a commit
counts only if the client's retries never get through), every greedy answer is the one its reported
`weight_version` gives, a stalled client holds up no one, and the image cache stays inside its bound.
A killed weight sender is in test_weights.py (and test_weights_vllm.py for vLLM).
"""

import base64
import io
import logging
import select
import socket
import threading
import time

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from protocol import image_sha256
from server.metrics import Metrics
from server.middleware import RequestLifecycle
from tests.test_weights import MAX_TOKENS, SMALL_BUCKET, Trainer
from tests.utils import ServerProcess, png_bytes, random_image
from trainer_client import AlignClient

pytestmark = pytest.mark.fault

KEY = "fault-key"
BODY_TIMEOUT_S = 20  # long enough for the other requests of the slow-upload test to finish first
CACHE_BYTES = 256_000  # 1,000 of the 8x8 uploads below
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def server(tiny_vlm, log_dir):
    s = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir,
                      extra=["--body-timeout", str(BODY_TIMEOUT_S), "--image-cache-bytes", str(CACHE_BYTES)])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def trainer(tiny_vlm):
    return Trainer(tiny_vlm)


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_64_clients_mixing_routes_during_3_pushes_lose_nothing_and_match_their_weights(server, trainer):
    check_mixed_clients_during_pushes(server, trainer)


def check_mixed_clients_during_pushes(server, trainer, clients: int = 64) -> None:
    """`clients` threads loop over generate (image inline the first time, or uploaded first: odd
    clients leave no room inline), chat (data-URL image) and info while the trainer pushes 3 new
    versions (http, tcp, shm); then every answer is checked against its version."""
    images = [random_image(300 + k) for k in range(4)]  # one size: no padding, so batching cannot change greedy
    v0 = httpx.get(f"{server.url}/v1/info", headers=server.headers()).json()["weight_version"]
    expected = {v0: [trainer.greedy([img]) for img in images]}  # version -> greedy tokens per image
    answers: list[tuple[str, int, int, object]] = []  # (route, weight_version, image index, answer)
    errors: list[BaseException] = []
    stop = threading.Event()

    def client_loop(k: int) -> None:
        with AlignClient(server.url, api_key=server.api_key, max_retries=8, backoff=0.05,
                         inline_image_bytes=0 if k % 2 else 8 << 20) as c:
            i = 0
            while not stop.is_set():
                kind, img = (k + i) % 3, (k + i) % len(images)
                i += 1
                try:
                    if kind == 0:  # token ids + an image sent once, then named by hash
                        out = c.generate(prompt_ids=[trainer.prompt_ids], images=[[images[img]]], temperature=0.0,
                                         max_tokens=MAX_TOKENS)
                        comp = out.results[0].completions[0]
                        assert comp.weight_version == out.weight_version
                        answers.append(("generate", out.weight_version, img, comp.token_ids))
                    elif kind == 1:  # OpenAI chat with the image inline as a data URL
                        out = c.chat([{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": _data_url(images[img])}},
                            {"type": "text", "text": QUESTION}]}], max_tokens=MAX_TOKENS, temperature=0.0,
                            return_token_ids=True)
                        version = out["choices"][0]["weight_version"]
                        answers.append(("chat", version, img, out["choices"][0]["token_ids"]))
                    else:
                        answers.append(("info", c.info(refresh=True).weight_version, -1, None))
                except BaseException as exc:  # noqa: BLE001 - every failure fails the test, named below
                    errors.append(exc)

    def answered_at(version: int) -> int:
        return sum(1 for _, v, _, _ in list(answers) if v == version)

    def wait_answers(version: int, count: int = 30, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while answered_at(version) < count and not errors:
            assert time.monotonic() < deadline, f"only {answered_at(version)} answers at version {version}"
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_answers(v0)
        pusher = AlignClient(server.url, api_key=server.api_key)
        for seed, transport in [(31, "http"), (32, "tcp"), (33, "shm")]:
            previous = expected[max(expected)]
            for attempt in range(10):  # every image's answer must change, else a stale answer would pass
                trainer.perturb(seed * 100 + attempt)
                tokens = [trainer.greedy([img]) for img in images]
                if all(a != b for a, b in zip(tokens, previous, strict=True)):
                    break
            else:
                raise AssertionError("ten perturbations left some image's greedy answer unchanged")
            version = pusher.push_weights(trainer.model, transport=transport, bucket_bytes=SMALL_BUCKET)
            expected[version] = tokens
            wait_answers(version)
        pusher.close()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert sorted(expected) == list(range(v0, v0 + 4))
    routes = {route for route, _, _, _ in answers}
    assert routes == {"generate", "chat", "info"}
    for route, version, img, answer in answers:
        assert version in expected, (route, version)
        if route == "generate":
            assert answer == expected[version][img], f"generate at version {version} answered with other weights"
        elif route == "chat":
            assert answer == expected[version][img], f"chat at version {version} answered with other weights"
    assert {v for route, v, _, _ in answers if route != "info"} == set(expected)


def _slow_put(server, body: bytes) -> socket.socket:
    """Open `PUT /v1/images/{sha}` and send the headers only; the caller trickles the body."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"PUT /v1/images/{image_sha256(body)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {KEY}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode())
    return sock


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_an_upload_at_1_byte_per_second_delays_no_one_and_ends_in_a_408(server, trainer):
    body = png_bytes(random_image(77, 32))
    sock = _slow_put(server, body)
    answered = threading.Event()

    def trickle() -> None:
        for b in body:
            if answered.wait(1.0):  # one byte a second until the server answers
                return
            try:
                sock.sendall(bytes([b]))
            except OSError:  # the server closed the connection after its 408
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        sock.sendall(body[:1])
        # While the upload is open, every other kind of request is served.
        with AlignClient(server.url, api_key=KEY, max_retries=0) as c:
            for k in range(3):
                out = c.generate(prompt_ids=[trainer.prompt_ids], images=[[random_image(400 + k)]],
                                 temperature=0.0, max_tokens=4)
                assert out.results[0].completions[0].token_ids
            assert c.info(refresh=True).model
            assert c.chat([{"role": "user", "content": QUESTION}], max_tokens=2)["choices"]
        assert not _answered(sock), "the slow upload was answered before the other requests finished"
        sock.settimeout(BODY_TIMEOUT_S * 3)
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the slow upload without an answer: {response!r}"
            response += chunk
    finally:
        answered.set()
        sock.close()
        sender.join(5)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"x-request-id" in head.lower()
    error = httpx.Response(408, content=payload).json()["error"]
    assert error["code"] == "timeout" and "--body-timeout" in error["message"], error
    sha = image_sha256(body)
    assert httpx.head(f"{server.url}/v1/images/{sha}", headers=server.headers()).status_code == 404
    assert 'route="/v1/images/{sha256}",status="408"' in httpx.get(f"{server.url}/metrics",
                                                                   headers=server.headers()).text


def _tiny_png(i: int) -> bytes:
    img = Image.new("RGB", (8, 8), ((i >> 16) & 255, (i >> 8) & 255, i & 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_distinct_uploads_2_5_times_its_bound_keep_the_image_cache_within_it(server):
    # (bench/data_rss.py uploads 10,000 images of 512x512 to a 256 MiB cache and reads the RSS)
    n, decoded = 2_500, 8 * 8 * 4  # Pillow holds an RGB pixel in 4 bytes, and the cache counts them so
    bodies = [_tiny_png(i) for i in range(n)]
    assert len({image_sha256(b) for b in bodies}) == n
    errors = []

    def upload(part: list[bytes]) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(),
                          limits=httpx.Limits(max_connections=1)) as http:
            for body in part:
                r = http.put(f"/v1/images/{image_sha256(body)}", content=body)
                if r.status_code != 201:
                    errors.append(r.text)

    for start in range(0, n, 500):  # check the bound between rounds, not only at the end
        chunk = bodies[start : start + 500]
        threads = [threading.Thread(target=upload, args=(chunk[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert _metric(server, "align_image_cache_bytes") <= CACHE_BYTES
    assert _metric(server, "align_image_cache_images") == CACHE_BYTES // decoded  # full, and no fuller
    h = server.headers()
    assert httpx.head(f"{server.url}/v1/images/{image_sha256(bodies[-1])}", headers=h).status_code == 200
    assert httpx.head(f"{server.url}/v1/images/{image_sha256(bodies[0])}", headers=h).status_code == 404
    assert server.alive()


def test_an_error_escaping_a_route_is_a_500_envelope_with_the_request_id_it_is_logged_under(caplog):
    async def broken(scope, receive, send):  # a bare ASGI app: nothing between the middleware and the bug
        raise RuntimeError("a bug")

    app = RequestLifecycle(broken, Metrics(), body_timeout_s=5)
    with caplog.at_level(logging.ERROR, logger="align-serve"):
        r = TestClient(app, raise_server_exceptions=False).get("/broken")
    assert r.status_code == 500
    error = r.json()["error"]
    request_id = r.headers["X-Request-ID"]
    assert error["code"] == "internal" and error["detail"]["request_id"] == request_id
    assert request_id in error["message"]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info and "a bug" in str(logged[0].exc_info[1])


GENERATE_TIMEOUT_S = 3


def test_a_generate_past_the_timeout_gets_a_504_and_the_server_serves_on(tiny_vlm, log_dir):
    # 16,384 sampled sequences of 64 tokens take 64 batched `generate` calls of 256 rows: far past
    # 3 s on any CPU, while a 1-prompt, 2-token request is far below it.
    s = ServerProcess(tiny_vlm, "transformers", api_key=KEY, log_dir=log_dir,
                      extra=["--generate-timeout", str(GENERATE_TIMEOUT_S)]).wait_ready()
    try:
        big = {"prompts": [{"prompt_ids": [1, 2, 3]}] * 1024, "sampling": {"n": 16, "max_tokens": 64}}
        r = httpx.post(f"{s.url}/v1/generate", json=big, headers=s.headers(), timeout=600)
        assert r.status_code == 504, r.text[:500]
        error = r.json()["error"]
        assert error["code"] == "timeout" and "--generate-timeout" in error["message"], error
        assert r.headers["X-Request-ID"]
        with AlignClient(s.url, api_key=KEY, max_retries=0) as c:
            assert c.generate(prompt_ids=[[1, 2, 3]], max_tokens=2).results[0].completions[0].token_ids
        assert _metric(s, "align_prompts_total") == 1  # the abandoned request never counted as served
    finally:
        s.stop()
