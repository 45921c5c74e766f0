"""Prometheus metrics: engine gauges and counters read at scrape time, latency histograms."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from kvcache.engine.engine import RequestOutput

GAUGES = {
    "kvcache_kv_cache_usage_ratio": ("kv_cache_usage", "Fraction of KV blocks in use."),
    "kvcache_kv_blocks_free": ("num_blocks_free", "KV blocks no request holds (cached prefixes included)."),
    "kvcache_kv_blocks_used": ("num_blocks_used", "KV blocks held by requests."),
    "kvcache_kv_blocks_cached_free": ("num_blocks_cached_free", "Free KV blocks that still hold a findable prefix."),
    "kvcache_num_requests_running": ("num_requests_running", "Requests in the running batch."),
    "kvcache_num_requests_waiting": ("num_requests_waiting", "Requests waiting for admission."),
    "kvcache_kv_cache_fragmentation_ratio": ("fragmentation", "Allocated KV slots that hold no token."),
    "kvcache_spec_acceptance_rate": ("spec_acceptance_rate", "Accepted / drafted speculative tokens so far."),
    "kvcache_spec_mean_accepted_length": ("spec_mean_accepted_length",
                                          "Drafts accepted per verification so far (mean)."),
}
COUNTERS = {  # prometheus-client adds the _total suffix
    "kvcache_prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "kvcache_prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "kvcache_num_preemptions": ("num_preemptions", "Requests preempted because KV blocks ran out."),
    "kvcache_spec_drafted_tokens": ("spec_drafted_tokens", "Speculative draft tokens verified."),
    "kvcache_spec_accepted_tokens": ("spec_accepted_tokens", "Speculative draft tokens accepted."),
    "kvcache_spec_verifications": ("spec_verifications", "Steps that verified drafts, per request."),
    "kvcache_kv_tokens_evicted": ("num_tokens_evicted", "KV tokens dropped by eviction policies."),
    "kvcache_kv_blocks_evicted": ("num_blocks_evicted", "KV blocks given back because their tokens were evicted."),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, (key, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for name, (key, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])
        yield GaugeMetricFamily("kvcache_kv_cache_bytes", "Bytes allocated for the KV cache.",
                                value=stats["kv_cache_bytes"])
        yield GaugeMetricFamily("kvcache_kv_bytes_used", "Bytes of the KV blocks requests hold now.",
                                value=stats["kv_bytes_used"])
        per_group = GaugeMetricFamily("kvcache_kv_group_blocks_used", "KV blocks a cache group's tables hold "
                                      "(a sliding group gives back what its window left).", labels=["group", "window"])
        for group in stats["groups"]:
            per_group.add_metric([str(group["group"]), str(group["window"] or "full")], group["blocks_used"])
        yield per_group
        yield from _offload_metrics(stats.get("kv_offload", {}))
        yield InfoMetricFamily("kvcache_kv_cache", "The KV cache's element format.",  # ..._info{kv_cache_dtype=}
                               value={"kv_cache_dtype": stats["kv_cache_dtype"]})


OFFLOAD_COUNTERS = {  # per tier (label tier="host" | "disk" | "redis")
    "hits": "Blocks found in the tier and copied back into the pool.",
    "misses": "Blocks asked of the tier and not found.",
    "stores": "Blocks the tier stored.",
    "evictions": "Blocks the tier evicted past its budget (redis: the server's evicted and expired keys).",
    "rejected": "Entries found truncated, corrupt or foreign: treated as misses and removed.",
    "errors": "I/O errors of the tier (a failing Redis is turned off).",
    "dropped": "Write-through stores dropped because the tier's write queue was full.",
    "hit_bytes": "Bytes read back from the tier.",
}


def _offload_metrics(tiers: dict[str, dict[str, Any]]):
    """The offload tiers' counters and byte gauge, one series per tier."""
    if not tiers:
        return
    for key, doc in OFFLOAD_COUNTERS.items():
        family = CounterMetricFamily(f"kvcache_kv_offload_{key}", doc, labels=["tier"])
        for name, counts in tiers.items():
            family.add_metric([name], counts[key])
        yield family
    held = GaugeMetricFamily("kvcache_kv_offload_bytes", "Bytes the tier holds (redis: stored by this engine).",
                             labels=["tier"])
    enabled = GaugeMetricFamily("kvcache_kv_offload_enabled", "1 while the tier is in use, 0 once it failed.",
                                labels=["tier"])
    for name, counts in tiers.items():
        held.add_metric([name], counts["bytes"])
        enabled.add_metric([name], int(counts["enabled"]))
    yield held
    yield enabled


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram("kvcache_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.tpot = Histogram("kvcache_time_per_output_token_seconds", "Mean time between output tokens.",
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5),
                              registry=self.registry)

    def observe(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.get("first_token_time") is None:
            return
        self.ttft.observe(m["first_token_time"] - m["arrival_time"])
        tokens = m["num_output_tokens_longest"]  # outputs may be deltas: count from the engine's figures
        if tokens > 1 and m.get("finish_time"):
            self.tpot.observe((m["finish_time"] - m["first_token_time"]) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
