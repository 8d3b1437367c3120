"""AlignClient against real servers: retries, several servers, images evicted from the cache."""

import httpx
import pytest

from tests.utils import ServerProcess, free_port, prompts_served, random_image
from trainer_client import AlignClient, AlignConnectionError

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def test_connection_refused_raises_after_retries():
    with AlignClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01) as client:
        with pytest.raises(AlignConnectionError):
            client.info()


def test_generate_waits_out_a_loading_server(tiny_vlm, log_dir):
    """Called the moment the server starts: connection errors, then 503 while loading, then the answer."""
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir)
    try:
        with AlignClient(server.url, max_retries=40, backoff=0.25) as client:
            out = client.generate(prompt_ids=[[1, 2, 3]], max_tokens=2)
        assert len(out.results[0].completions[0].token_ids) >= 1
    finally:
        server.stop()


@pytest.mark.fault
def test_a_call_waits_out_a_server_restart(tiny_vlm, log_dir):
    """SIGKILLed and started again on its port: refused connections, 503 while it loads, then the
    answer, from a new instance serving its start checkpoint (version 0) again."""
    from transformers import AutoModelForImageTextToText

    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    try:
        with AlignClient(server.url, max_retries=0, retry_for=300) as client:
            client.push_weights(AutoModelForImageTextToText.from_pretrained(tiny_vlm), transport="http")
            first = client.info(refresh=True)
            server.kill()
            server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir, port=server.port)
            out = client.generate(prompt_ids=[[1, 2, 3]], max_tokens=2)
        assert first.weight_version == 1
        assert out.instance_id != first.instance_id and out.weight_version == 0
    finally:
        server.stop()


def test_a_batch_is_spread_over_several_servers_and_answered_in_order(tiny_vlm, log_dir):
    servers = [ServerProcess(tiny_vlm, "transformers", log_dir=log_dir) for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        with AlignClient([s.url for s in servers]) as client:
            texts = [f"Shape number {k}" for k in range(6)]
            messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in texts]
            out = client.generate(messages=messages, images=[[random_image(k)] for k in range(6)], max_tokens=2)
            tok = client.info().image_token_id
        assert [prompts_served(s) for s in servers] == [3.0, 3.0]
        # answers come back in the caller's order: each prompt's ids hold its own text
        for k, result in enumerate(out.results):
            assert result.prompt_ids.count(tok) == 1
            assert str(k) in "".join(_decode(tiny_vlm, result.prompt_ids))
    finally:
        for s in servers:
            s.stop()


def _decode(model_dir, ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids)


def test_images_evicted_from_the_server_cache_are_uploaded_again(tiny_vlm, log_dir):
    # room for about two 64x64 images: the third upload evicts the first
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir,
                           extra=["--image-cache-bytes", str(64 * 64 * 4 * 2)]).wait_ready()
    try:
        with AlignClient(server.url) as client:
            first, *others = [random_image(k) for k in range(3)]
            client.generate(messages=[QUESTION], images=[[first]], max_tokens=1)
            for img in others:
                client.generate(messages=[QUESTION], images=[[img]], max_tokens=1)
            out = client.generate(messages=[QUESTION], images=[[first]], max_tokens=1)
        assert len(out.results[0].completions) == 1
        # the last call named `first` by hash, was told the server no longer holds it, and sent it again
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'align_requests_total{route="/v1/generate",status="400"} 1.0' in metrics
    finally:
        server.stop()


def test_new_images_go_inline_once_then_by_hash(tiny_vlm, log_dir):
    """A GRPO step brings new images every time: they ride in the generate request itself (no HEAD and
    PUT round trips per image); the server keeps them, so the next request names them by hash. Images
    beyond the request's inline budget are uploaded first, as before."""
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    sent: list[tuple[str, str, bytes]] = []
    try:
        with AlignClient(server.url) as client:
            client._http[0].event_hooks["request"].append(
                lambda r: sent.append((r.method, r.url.path, r.read())))
            images = [[random_image(k)] for k in range(3)]
            first = client.generate(messages=[QUESTION] * 3, images=images, max_tokens=2, temperature=0.0)
            second = client.generate(messages=[QUESTION] * 3, images=images, max_tokens=2, temperature=0.0)
            assert [(m, p) for m, p, _ in sent] == [("POST", "/v1/generate")] * 2
            assert sent[0][2].count(b'"data"') == 3 and b'"sha256"' not in sent[0][2]
            assert sent[1][2].count(b'"sha256"') == 3 and b'"data"' not in sent[1][2]
            assert [r.completions[0].token_ids for r in first.results] == \
                [r.completions[0].token_ids for r in second.results]

            sent.clear()
            client.inline_image_bytes = 0  # no room inline: each new image is uploaded first
            client.generate(messages=[QUESTION], images=[[random_image(9)]], max_tokens=1)
            assert [(m, p.split("/")[2]) for m, p, _ in sent] == [("HEAD", "images"), ("PUT", "images"),
                                                                  ("POST", "generate")]
    finally:
        server.stop()


def test_a_batch_over_the_request_limit_goes_as_several_requests(tiny_vlm, log_dir):
    from protocol import MAX_SEQUENCES_PER_REQUEST

    n = 512
    rows = [[1, 2, 30 + k] for k in range(MAX_SEQUENCES_PER_REQUEST // n + 1)]  # one prompt too many
    server = ServerProcess(tiny_vlm, "transformers", log_dir=log_dir).wait_ready()
    try:
        with AlignClient(server.url) as client:
            out = client.generate(prompt_ids=rows, n=n, max_tokens=1)
        assert [r.prompt_ids for r in out.results] == rows  # every prompt, in order
        assert all(len(r.completions) == n for r in out.results)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'align_requests_total{route="/v1/generate",status="200"} 2.0' in metrics
    finally:
        server.stop()


def test_a_server_that_never_answers_raises_a_timeout_naming_the_setting():
    """A peer that accepts the connection and then stalls: the client gives up after its own `timeout`."""
    import socket

    from trainer_client import AlignTimeoutError

    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)  # the kernel completes the handshake; nothing ever reads or answers
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        with AlignClient(url, timeout=0.5, connect_timeout=5.0, max_retries=3, backoff=0.01) as client:
            with pytest.raises(AlignTimeoutError, match="timeout"):
                client.info()
