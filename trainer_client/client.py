"""`AlignClient`: the training process's handle on one or more `align-serve` servers."""

import base64
import io
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from protocol import (
    API_PREFIX,
    MAX_PROMPTS_PER_REQUEST,
    MAX_SEQUENCES_PER_REQUEST,
    ErrorEnvelope,
    GeneratePrompt,
    GenerateRequest,
    GenerateResponse,
    ImageRef,
    SamplingParams,
    ServerInfo,
    VideoRef,
    image_sha256,
)
from trainer_client.waiting import WaitReport, not_ready, unreachable
from trainer_client.weights import DEFAULT_BUCKET_BYTES, push_adapter, push_weights

log = logging.getLogger(__name__)


class AlignServerError(RuntimeError):
    """The server answered with an error envelope."""

    def __init__(self, status: int, code: str, message: str, detail=None, url: str = ""):
        super().__init__(f"{url} answered {status} {code}: {message}")
        self.status, self.code, self.message, self.detail, self.url = status, code, message, detail, url


class AlignConnectionError(ConnectionError):
    """No server answered after every retry."""


class AlignTimeoutError(AlignConnectionError):
    """A server took the connection but did not answer within the client's `timeout`."""


def collapse_image_runs(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Ids a processor expanded into plain runs of the marker (Qwen-VL's `<|image_pad|>` x N, LLaVA-OneVision's
    `<image>` x N per image) -> one marker per image. Other families wrap their features in other tokens:
    `runtime.image_tokens.ImageTokens.unexpand` is the inverse for every family."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


def encode_image(image: Image.Image | bytes) -> bytes:
    """PNG bytes of an image (bytes pass through: an already encoded file keeps its hash)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class AlignClient:
    def __init__(self, base_urls: str | Sequence[str], api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 5, backoff: float = 0.5, connect_timeout: float = 10.0,
                 retry_for: float = 0.0, inline_image_bytes: int = 8 * 1024 * 1024, start_hint: str = ""):
        """`timeout`: seconds to wait for a server's answer (a big generate takes minutes; the server's own
        --generate-timeout answers 504 first by default). `connect_timeout`: seconds to open a
        connection; a timed-out connect is retried like a refused one, a timed-out answer is not
        (the request may have run) and raises `AlignTimeoutError`. `retry_for`: seconds a call keeps
        retrying connection errors and 503s (at least `max_retries` tries), so a restarting server is waited out.
        `inline_image_bytes`: encoded bytes of new images a generate request carries inline (the server
        keeps them by hash, so later requests name them by hash); new images beyond it are uploaded first,
        one PUT each. Inline saves two round trips per new image, which a GRPO step pays for every image.
        `start_hint`: what starts a server for this run (`align-serve --model ...`), said while a wait lasts."""
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("AlignClient needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.max_retries, self.backoff, self.retry_for = max_retries, backoff, retry_for
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeouts = httpx.Timeout(timeout, connect=connect_timeout)
        self._http = [httpx.Client(base_url=u, headers=headers, timeout=timeouts) for u in self.base_urls]
        self._uploaded: list[set[str]] = [set() for _ in self.base_urls]
        self.inline_image_bytes = inline_image_bytes
        self.start_hint = start_hint
        self._info: ServerInfo | None = None
        self._next = 0

    def close(self) -> None:
        for h in self._http:
            h.close()

    def __enter__(self) -> "AlignClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport ------------------------------------------------------------------------------
    def _request(self, server: int, method: str, path: str, **kwargs) -> httpx.Response:
        """One call with retries on connection errors and 503; other errors raise at once."""
        http = self._http[server]
        deadline = time.monotonic() + self.retry_for
        # A blip (a 503 while a commit lands) passes unsaid; a server gone for a second is reported.
        report = WaitReport(f"{http.base_url}{path}", self.retry_for, self.start_hint, first_after=1.0)
        attempt = 0
        while True:
            last = attempt >= self.max_retries and time.monotonic() >= deadline
            try:
                r = http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if last:
                    raise AlignConnectionError(f"{http.base_url}{path}: {exc or type(exc).__name__} (gave up after "
                                               f"{attempt + 1} tries; a restarting server needs a longer retry_for)") from exc
                why = unreachable(exc)
            except httpx.TimeoutException as exc:
                raise AlignTimeoutError(f"{http.base_url}{path}: no answer within {http.timeout.read:g} s "
                                        "(AlignClient's `timeout`)") from exc
            else:
                if r.status_code != 503 or last:
                    if r.status_code >= 400 and method != "HEAD":
                        raise self._error(r)
                    return r
                why = not_ready(r)
            if self.retry_for:
                report.say(why)
            time.sleep(min(self.backoff * 2**attempt, 5.0))
            attempt += 1

    @staticmethod
    def _error(r: httpx.Response) -> AlignServerError:
        try:
            err = ErrorEnvelope.model_validate(r.json()).error
            return AlignServerError(r.status_code, err.code.value, err.message, err.detail, str(r.request.url))
        except Exception:
            return AlignServerError(r.status_code, "unknown", r.text[:500], None, str(r.request.url))

    # ---- status ---------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 600.0, poll: float = 0.5, report_every: float = 10.0) -> ServerInfo:
        """Block until every server reports ready (model loaded, no commit under way). Says at once, then
        every `report_every` s, which server it waits for, why (refused, 503 loading...), how long out of
        `timeout`, and `start_hint`. A 4xx (a wrong API key, not an align-serve) raises `AlignServerError` at once."""
        deadline = time.monotonic() + timeout
        hint = f"; {self.start_hint}" if self.start_hint else ""
        for i, http in enumerate(self._http):
            report = WaitReport(f"{self.base_urls[i]} to be ready", timeout, self.start_hint, report_every)
            while True:
                try:
                    r = http.get("/ready")
                except httpx.UnsupportedProtocol as exc:
                    raise AlignConnectionError(f"{self.base_urls[i]}: {exc}") from None
                except httpx.TransportError as exc:
                    why = unreachable(exc)
                else:
                    if r.status_code == 200:
                        break
                    if 400 <= r.status_code < 500:
                        raise self._error(r)  # a wrong key or URL: waiting does not fix it
                    why = not_ready(r)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.base_urls[i]} not ready after {timeout:.0f} s: {why}{hint}")
                report.say(why)
                time.sleep(poll)
        return self.info(refresh=True)

    def info(self, refresh: bool = False, server: int = 0) -> ServerInfo:
        """`GET /v1/info` of server number `server` (the first one's answer is cached)."""
        if server != 0:
            return ServerInfo.model_validate(self._request(server, "GET", f"{API_PREFIX}/info").json())
        if self._info is None or refresh:
            self._info = ServerInfo.model_validate(self._request(0, "GET", f"{API_PREFIX}/info").json())
        return self._info

    # ---- images ---------------------------------------------------------------------------------
    def upload_image(self, image: Image.Image | bytes, server: int = 0) -> str:
        """Make sure `server` holds the image; returns its sha256. Sends the bytes at most once."""
        data = encode_image(image)
        sha = image_sha256(data)
        if sha in self._uploaded[server]:
            return sha
        path = f"{API_PREFIX}/images/{sha}"
        if self._request(server, "HEAD", path).status_code != 200:
            self._request(server, "PUT", path, content=data, headers={"Content-Type": "application/octet-stream"})
        self._uploaded[server].add(sha)
        return sha

    def _image_refs(self, server: int, images, videos=None) -> tuple[list[list[ImageRef]], list | None, set[str]]:
        """Each prompt's images for one generate request, and its videos' frames: by hash where `server`
        holds them, else inline while the request's `inline_image_bytes` last, else uploaded first. Also
        the inlined hashes."""
        budget, inline = self.inline_image_bytes, set()

        def ref(img) -> ImageRef:
            nonlocal budget
            data = encode_image(img)
            sha = image_sha256(data)
            if sha in self._uploaded[server]:
                return ImageRef(sha256=sha)
            if len(data) <= budget:
                budget -= len(data)
                inline.add(sha)
                return ImageRef(data=base64.b64encode(data).decode("ascii"))
            return ImageRef(sha256=self.upload_image(data, server))

        image_refs = [[ref(img) for img in imgs] for imgs in images]
        video_refs = None if videos is None else [
            [VideoRef(frames=[ref(frame) for frame in video], fps=getattr(video, "fps", None)) for video in vids] or None
            for vids in videos]
        return image_refs, video_refs, inline

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        images: Sequence[Sequence[Image.Image | bytes]] | None = None,
        messages: Sequence[list[dict]] | None = None,
        videos: Sequence[Sequence[Sequence[Image.Image | bytes]]] | None = None,
        sampling: SamplingParams | None = None,
        check: Callable[[int, GenerateResponse], None] | None = None,
        **sampling_kwargs,
    ) -> GenerateResponse:
        """Generate for a batch of prompts: token ids (one image marker per image; a prompt holding more
        markers than images has them collapsed, as in a Qwen-VL processor's runs) or chat messages, each with
        its images (PIL or encoded bytes); `videos`: each prompt's videos (with prompt_ids holding one video
        marker, /v1/info's video_token_id, per video), each the list of frames sampled from it, sent as images
        are (once, then by hash), with its `fps` where it has one (a `VideoFrames`: the rate they were sampled
        at, which Qwen2.5-VL needs). Sampling fields as keywords
        (`n=8, temperature=1.0, max_tokens=64, ...`) or a `SamplingParams`. With several servers
        the batch is split across them and answered in order. `check(server, answer)` sees each
        server's answer before they are merged and may refuse it by raising (the trainer refuses
        answers from weights it did not push)."""
        if (prompt_ids is None) == (messages is None):
            raise ValueError("give exactly one of prompt_ids or messages")
        sampling = sampling or SamplingParams(**sampling_kwargs)
        rows = list(prompt_ids if prompt_ids is not None else messages)
        images = list(images) if images is not None else [[] for _ in rows]
        if len(images) != len(rows):
            raise ValueError(f"{len(rows)} prompts but {len(images)} image lists")
        if videos is not None and len(videos) != len(rows):
            raise ValueError(f"{len(rows)} prompts but {len(videos)} video lists")
        if prompt_ids is not None and any(images):
            token = self.info().image_token_id
            # Markers side by side are separate images (Idefics3's template writes `<image><image>`): only a
            # prompt with more markers than images holds runs.
            rows = [collapse_image_runs(r, token) if token is not None and list(r).count(token) > len(imgs) else list(r)
                    for r, imgs in zip(rows, images, strict=True)]
        # One request holds at most MAX_SEQUENCES_PER_REQUEST sequences (prompts x n): bigger
        # batches go as several requests, spread over the servers and answered in order.
        per_request = max(1, min(MAX_PROMPTS_PER_REQUEST, MAX_SEQUENCES_PER_REQUEST // sampling.n))
        shards = [(server, s, min(s + per_request, stop))
                  for server, start, stop in self._shards(len(rows)) for s in range(start, stop, per_request)]
        def answer(server: int, start: int, stop: int) -> GenerateResponse:
            out = self._generate_on(server, rows[start:stop], images[start:stop], sampling, prompt_ids is not None,
                                    None if videos is None else videos[start:stop])
            if check is not None:
                check(server, out)
            return out

        if len(shards) == 1:
            return answer(*shards[0])
        with ThreadPoolExecutor(min(len(shards), 4 * len(self.base_urls))) as pool:
            parts = list(pool.map(lambda s: answer(*s), shards))
        return GenerateResponse(results=[r for p in parts for r in p.results],
                                weight_version=max(p.weight_version for p in parts),
                                instance_id=",".join(dict.fromkeys(p.instance_id for p in parts)))

    def _shards(self, n_rows: int) -> list[tuple[int, int, int]]:
        """(server, start, stop) slices; a single-prompt call rotates over servers."""
        k = len(self.base_urls)
        if k == 1 or n_rows == 1:
            self._next = (self._next + 1) % k
            return [(self._next, 0, n_rows)]
        size = -(-n_rows // k)
        return [(i, s, min(s + size, n_rows)) for i, s in enumerate(range(0, n_rows, size))]

    def _generate_on(self, server: int, rows, images, sampling: SamplingParams, as_ids: bool,
                     videos=None) -> GenerateResponse:
        def body() -> tuple[dict, set[str]]:
            refs, video_refs, inline = self._image_refs(server, images, videos)
            video_refs = video_refs or [None] * len(rows)
            prompts = [GeneratePrompt(prompt_ids=list(row), images=r, videos=v) if as_ids
                       else GeneratePrompt(messages=row, images=r, videos=v)
                       for row, r, v in zip(rows, refs, video_refs, strict=True)]
            return GenerateRequest(prompts=prompts, sampling=sampling).model_dump(mode="json", exclude_none=True), inline

        request, inline = body()
        try:
            r = self._request(server, "POST", f"{API_PREFIX}/generate", json=request)
        except AlignServerError as exc:
            if exc.code != "unknown_image":
                raise
            # The server's LRU evicted an image we sent before (or it restarted): send them again, once.
            self._uploaded[server].clear()
            request, inline = body()
            r = self._request(server, "POST", f"{API_PREFIX}/generate", json=request)
        self._uploaded[server].update(inline)  # the server resolved them, so it holds them now
        return GenerateResponse.model_validate(r.json())

    # ---- weights --------------------------------------------------------------------------------
    def push_weights(self, weights, transport: str = "auto", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     **kwargs) -> int:
        """Sync new weights (an `nn.Module`, PEFT merged on the fly, a state dict or (name, tensor)
        pairs) to every server; returns the new `weight_version`. See `trainer_client.weights`."""
        return push_weights(self, weights, transport=transport, bucket_bytes=bucket_bytes, **kwargs)

    def push_adapter(self, model, transport: str = "auto", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     **kwargs) -> int:
        """Sync a PEFT model's active LoRA adapter alone to every server (`align-serve --enable-lora`);
        returns the new `weight_version`. See `trainer_client.weights.push_adapter`."""
        return push_adapter(self, model, transport=transport, bucket_bytes=bucket_bytes, **kwargs)

    def chat(self, messages: list[dict], **params) -> dict:
        """OpenAI-style chat completion (`/v1/chat/completions`); image parts as data URLs."""
        return self._request(0, "POST", f"{API_PREFIX}/chat/completions", json={"messages": messages, **params}).json()
