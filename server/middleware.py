"""What every request goes through: a request id, metrics, a deadline on the body, and a last-resort 500.

Plain ASGI rather than `BaseHTTPMiddleware`: it has to wrap `receive` (a client trickling its body
at 1 byte/s must not hold a connection forever) and to catch what escapes the routes, logging it
with the id the client gets back.
"""

import asyncio
import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from protocol import ErrorCode
from server.errors import envelope
from server.metrics import Metrics

log = logging.getLogger("align-serve")

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a caller's own id is echoed only if it is this tame


def internal_error(request_id: str) -> JSONResponse:
    """The 500 answer: it names the id the server log has the traceback under."""
    return envelope(500, ErrorCode.internal, f"internal error (request id {request_id}); the server log has the "
                    "traceback under this id", {"request_id": request_id})


class RequestLifecycle:
    def __init__(self, app, metrics: Metrics, body_timeout_s: float):
        self.app, self.metrics, self.body_timeout_s = app, metrics, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        deadline = time.monotonic() + self.body_timeout_s
        body_done, timed_out, status = False, False, None

        async def receive_with_deadline():
            nonlocal body_done, timed_out
            if body_done:  # after the body, `receive` only reports a disconnect: no deadline on that
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # The route sees a disconnect and gives up; the 408 below is what the client gets.
                timed_out = body_done = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                if timed_out:
                    return
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            elif timed_out and status is None:
                return
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive_with_deadline, send_with_id)
        except ClientDisconnect:
            if not timed_out:  # the client left mid-body: no one to answer, nothing to log as a bug
                status = status or 499
        except Exception:
            if not timed_out:
                log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
                if status is None:
                    status = 500
                    await self._send(send, internal_error(request_id), request_id)
        finally:
            self.metrics.inflight.dec()
        if timed_out and status is None:
            status = 408
            await self._send(send, envelope(
                408, ErrorCode.timeout, f"the request body did not arrive within {self.body_timeout_s:g} s "
                "(see the server's --body-timeout); send it faster or in smaller parts", {"request_id": request_id}),
                request_id)
        route = scope.get("route")
        path = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)

    @staticmethod
    async def _send(send, response, request_id: str) -> None:
        response.headers[REQUEST_ID_HEADER] = request_id
        await response({"type": "http"}, None, send)
