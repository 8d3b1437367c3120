"""A wait the user can see: what it waits for, why, and for how long, at once and then every few seconds.

A trainer that waits in silence cannot be told apart from one that hangs: a server still loading, a
wrong URL and a server never started all look the same. Every wait a user can meet (a server starting
or restarting, a weight sync held by another trainer) reports through `WaitReport`.
"""

import logging
import time

import httpx

log = logging.getLogger(__name__)


class WaitReport:
    def __init__(self, what: str, limit: float, hint: str = "", every: float = 10.0, first_after: float = 0.0):
        """`what` is waited for up to `limit` seconds (the setting that bounds it is named by the caller in
        `what` or `hint`); `hint` says what the user can do. The first line comes `first_after` seconds
        into the wait (0: at once), then one every `every` seconds."""
        self.what, self.limit, self.hint, self.every = what, limit, hint, every
        self.started = time.monotonic()
        self._next = self.started + first_after

    def say(self, why: str) -> None:
        """Log the wait's state, if its next line is due."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        hint = f"; {self.hint}" if self.hint else ""
        log.warning("waiting for %s: %s (%.0f s of %.0f s)%s", self.what, why, now - self.started, self.limit, hint)


def unreachable(exc: httpx.TransportError) -> str:
    """Why a server could not be reached, in words a user can act on."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "no answer to the connection (a wrong host, or a firewall?)"
    if isinstance(exc, httpx.ConnectError) and "refused" in str(exc).lower():
        return "connection refused (no server listens there yet)"
    return f"{type(exc).__name__}: {exc}"


def not_ready(r: httpx.Response) -> str:
    """Why a server that answered is not ready: its error envelope's message (503: loading or committing)."""
    try:
        message = r.json()["error"]["message"]
    except Exception:
        message = r.text[:200] or r.reason_phrase
    return f"{r.status_code} {message}"
