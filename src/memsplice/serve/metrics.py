"""Prometheus metrics of one server, in a registry of its own (several apps in one process never collide).

Routes are labelled by their template (`/v1/memory/scopes/{scope}`), never by the concrete path, so scope ids do
not become label values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "memsplice_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "memsplice_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "memsplice_prompt_tokens_total", "prompt tokens of chat requests", registry=r
        )
        self.completion_tokens = Counter("memsplice_completion_tokens_total", "tokens generated", registry=r)
        self.memory_reads = Counter(
            "memsplice_memory_reads_total", "chat requests that spliced live memory", registry=r
        )
        self.memory_writes = Counter(
            "memsplice_memory_writes_total", "acknowledged memory writes", registry=r
        )
        self.turns_written = Counter("memsplice_memory_turns_total", "turns written to memory", registry=r)
        self.fallbacks = Counter(
            "memsplice_fallback_events_total", "memory fallback events by reason", ["reason"], registry=r
        )
        self.scope_deletions = Counter("memsplice_scope_deletions_total", "scopes deleted", registry=r)
        self.queue_depth = Gauge(
            "memsplice_inference_queue_depth", "model jobs queued or running", registry=r
        )
        self.scopes_loaded = Gauge("memsplice_scopes_loaded", "scope memories held in RAM", registry=r)
        self.online_updates = Counter(
            "memsplice_online_updates_total", "online learning updates applied", registry=r
        )
        self.online_errors = Counter(
            "memsplice_online_errors_total", "online learning updates that failed", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
