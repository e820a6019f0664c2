"""`Metrics`: the server's Prometheus metrics (`GET /metrics`), in a
registry of its own per server (no process-wide state: two servers in one
process report separately).

Gauges and counters the engine and the prefix cache already keep are read
when scraped (nothing is added to the decode path; the engine's time to
first token is bucketed as tokens are delivered); the HTTP adapter observes
what only it sees (its requests' time to first token, from their arrival).
"""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .record import FIRST_TOKEN_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    """Reads the engine's books and the prefix cache's counters at scrape time."""

    def __init__(self, engine, cache, server):
        self.engine = engine
        self.cache = cache
        self.server = server

    def collect(self):
        engine = self.engine
        records = list(engine.sessions.values())
        live = sum(1 for es in records if es.live is not None)
        sessions = GaugeMetricFamily("streamgemma_sessions", "Sessions open in the engine, by where their state is",
                                     labels=["state"])
        sessions.add_metric(["live"], live)
        sessions.add_metric(["suspended"], len(records) - live)
        yield sessions
        yield GaugeMetricFamily("streamgemma_decode_batch_size",
                                "Sessions generating now (the rows of the next decode step)",
                                value=sum(1 for es in records if es.generation is not None))
        yield GaugeMetricFamily("streamgemma_queue_sessions", "Sessions with input waiting to be prefilled",
                                value=len(engine.inputs.waiting))
        yield GaugeMetricFamily("streamgemma_queued_tokens", "Input token ids waiting to be prefilled",
                                value=engine.inputs.tokens)
        stats = engine.stats
        yield CounterMetricFamily("streamgemma_generated_tokens", "Tokens generated (rate: tokens/s)",
                                  value=stats.decoded_tokens)
        yield CounterMetricFamily("streamgemma_decoded_input_tokens", "Input tokens consumed in decode rows (short "
                                  "appends riding a step)", value=stats.decoded_input_tokens)
        yield CounterMetricFamily("streamgemma_decode_steps", "Batched decode steps, with generated rows, input rows "
                                  "or both ((generated + decoded input) / steps: mean rows a step)",
                                  value=stats.decode_calls)
        yield CounterMetricFamily("streamgemma_prefill_calls", "Prefill chunks run", value=stats.prefill_calls)
        yield CounterMetricFamily("streamgemma_suspensions", "Sessions suspended to the store",
                                  value=stats.suspensions)
        yield CounterMetricFamily("streamgemma_resumptions", "Sessions restored from the store",
                                  value=stats.resumptions)
        cumulative = list(itertools.accumulate(stats.first_token_buckets))
        yield HistogramMetricFamily(
            "streamgemma_engine_time_to_first_token_seconds",
            "Every generation (websocket and HTTP): from its generate call, queued input consumed first, to its "
            "first token", buckets=[*((str(b), n) for b, n in zip(FIRST_TOKEN_BUCKETS, cumulative)),
                                    ("+Inf", stats.first_token_count)],
            sum_value=stats.first_token_seconds)
        if self.server is not None:
            yield GaugeMetricFamily("streamgemma_websocket_connections", "Websocket connections open",
                                    value=len(self.server.connections))
        cache = self.cache
        if cache is not None:
            yield CounterMetricFamily("streamgemma_prefix_cache_hits", "Requests that restored a cached prefix",
                                      value=cache.hits)
            yield CounterMetricFamily("streamgemma_prefix_cache_misses", "Requests that found no cached prefix",
                                      value=cache.misses)
            yield CounterMetricFamily("streamgemma_prefix_cache_hit_tokens",
                                      "Prompt tokens not recomputed thanks to the prefix cache",
                                      value=cache.hit_tokens)
            yield GaugeMetricFamily("streamgemma_prefix_cache_entries", "States in the prefix cache",
                                    value=len(cache))
            yield GaugeMetricFamily("streamgemma_prefix_cache_store_bytes",
                                    "Bytes of prefix-cache snapshots in the store", value=cache.stored_bytes)


class Metrics:
    """One server's metrics. `server`: the websocket `Server` (for its
    connection count) or None; `cache`: the `PrefixCache` or None."""

    def __init__(self, engine, cache=None, server=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, cache, server))
        self.time_to_first_token = Histogram(
            "streamgemma_time_to_first_token_seconds", "HTTP API: from a request's arrival to its first token",
            ["endpoint"], buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.requests = Counter("streamgemma_http_requests", "HTTP API requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
