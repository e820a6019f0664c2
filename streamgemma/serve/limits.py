"""The server's limits (`Limits`) and the per-connection rate limit."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-server limits (defaults in parentheses).

    max_message_bytes: largest frame a client may send (1 MiB); a larger one
    closes the connection with code 1009. sessions_per_connection: sessions one
    connection may hold (16). max_sessions: sessions all connections together
    may hold (4096). max_connections: connections at once, websocket and HTTP
    API together (1024; fewer if the process's file limit is lower); more get
    HTTP 503. messages_per_second /
    bytes_per_second: what one connection may send (200 frames, 2 MiB, with a
    second's worth saved up); beyond that the server reads its frames more
    slowly (backpressure, no error), and one that stays beyond it for
    rate_grace seconds (10) is closed with code 1008 (its keepalive replies
    wait behind its own frames). max_tokens: largest max_tokens of a
    generation (4096); default_max_tokens: when a generate omits it (256).
    send_queue: events queued for one connection (4096 frames); a client
    that reads so slowly that it fills up is disconnected (code 1008) so it
    never slows other sessions. ping_interval / ping_timeout: websocket
    keepalive (20 s / 20 s). idle_timeout: a connection that sends nothing for
    this long while none of its sessions generates or has input waiting is
    closed (300 s; an HTTP API connection, when it has no request in progress).
    coalesce_interval: for a generation that asked for coalescing, the least
    time between two of its frames (0.02 s, at most 0.1 s): each frame
    carries every token ready by then, so a token waits at most this long and
    the server sends at most 1/coalesce_interval frames per second per
    generation however fast the model decodes. 0: send whatever is ready
    whenever the connection's writer gets to it.
    """

    max_message_bytes: int = 1 << 20
    sessions_per_connection: int = 16
    max_sessions: int = 4096
    max_connections: int = 1024
    messages_per_second: float = 200.0
    bytes_per_second: float = 2 << 20
    rate_grace: float = 10.0
    max_tokens: int = 4096
    default_max_tokens: int = 256
    send_queue: int = 4096
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    idle_timeout: float = 300.0
    coalesce_interval: float = 0.02

    def __post_init__(self):
        if not 0 <= self.coalesce_interval <= 0.1:
            raise ValueError(f"coalesce_interval must be in [0, 0.1] seconds (it adds latency), "
                             f"got {self.coalesce_interval!r}")
        for name in ("max_message_bytes", "sessions_per_connection", "max_sessions", "max_connections",
                     "messages_per_second", "bytes_per_second", "rate_grace", "max_tokens", "default_max_tokens",
                     "send_queue", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class RateLimit:
    """A token bucket: `rate` units a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.at = now

    def delay(self, cost: float, now: float) -> float:
        """Spend `cost`; the seconds to wait before the bucket is back above 0."""
        self.level = min(self.burst, self.level + (now - self.at) * self.rate) - cost
        self.at = now
        return max(0.0, -self.level / self.rate)


MIN_WAIT_S = 0.01


class Throttle:
    """How fast the server reads one connection: its frames and bytes (token
    buckets, a second's worth saved up; a frame of the largest size always
    fits). A client over its rate is read more slowly, and TCP slows it
    down; one that keeps the reader waiting nearly all the time for
    `rate_grace` seconds is `flooding`: its own keepalive replies wait behind
    its frames, so the server closes it (with a reason) before the keepalive
    would."""

    def __init__(self, limits: Limits, now: float):
        self.messages = RateLimit(limits.messages_per_second, limits.messages_per_second, now)
        self.volume = RateLimit(limits.bytes_per_second, max(limits.bytes_per_second, limits.max_message_bytes), now)
        self.grace = limits.rate_grace
        self.flooding = False
        self._window_start = now
        self._waited = 0.0

    def wait(self, frame_bytes: int, now: float) -> float:
        """A frame of `frame_bytes` was read at `now`: seconds to wait before
        reading the next."""
        wait = max(self.messages.delay(1, now), self.volume.delay(frame_bytes, now))
        if wait < MIN_WAIT_S:  # the debt is carried: a timer per frame would cost more than the frame
            wait = 0.0
        self._waited += wait
        elapsed = now - self._window_start
        if elapsed >= self.grace:
            self.flooding = self._waited >= 0.9 * elapsed
            self._window_start, self._waited = now, 0.0
        return wait


DEFAULT_LIMITS = Limits()  # frozen: shared as a default argument
