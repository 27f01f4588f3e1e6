"""Prometheus metrics of the scorer, served on ``--metrics-port``."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .names import is_valid_name


class _DatasetEntries:
    """``jest_cache_dataset_entries{model,dataset}``, read from the cache at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[tuple[str, str], int]] | None = None

    def collect(self):
        family = GaugeMetricFamily("jest_cache_dataset_entries", "Reference cache entries by model and "
                                   "dataset (at most 64 datasets per model; private namespaces as _private)",
                                   labels=["model", "dataset"])
        for (model, dataset), n in (self.source() if self.source else {}).items():
            family.add_metric([model, dataset], n)
        yield family

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All the scorer's metrics in one registry (one per server, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None
        self._jobs: set[str] = set()
        r = self.registry
        self.calls = Counter("jest_calls", "RPCs answered, by method, job and status code",
                             ["method", "job", "code"], registry=r)
        self.latency = Histogram("jest_call_seconds", "RPC latency, by method and job",
                                 ["method", "job"], buckets=LATENCY_BUCKETS, registry=r)
        self.examples = Counter("jest_examples", "Examples scored, by job", ["job"], registry=r)
        self.cache_hits = Counter("jest_cache_hits", "Reference cache hits (examples)", ["model"], registry=r)
        self.cache_misses = Counter("jest_cache_misses", "Reference cache misses (examples)", ["model"], registry=r)
        self.cache_bytes = Gauge("jest_cache_bytes", "Bytes held by the reference cache", registry=r)
        self.cache_entries = Gauge("jest_cache_entries", "Entries in the reference cache", registry=r)
        self.batch_rows = Histogram("jest_batch_rows", "Rows per reference inference batch", ["model"],
                                    buckets=(1, 16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.queue_rows = Gauge("jest_queue_rows", "Rows waiting for reference inference", ["model"], registry=r)
        self.rejected = Counter("jest_queue_rejected", "Requests refused with RESOURCE_EXHAUSTED (queue or "
                                "in-flight bound)", ["model"], registry=r)
        self.inflight = Gauge("jest_inflight_calls", "Select/Reference calls in flight", registry=r)
        self.models_loaded = Gauge("jest_models_loaded", "Reference models loaded and serving", registry=r)
        self.inference = Histogram("jest_inference_seconds", "Seconds per reference inference batch",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.nonfinite = Counter("jest_nonfinite_reference", "Examples whose reference outputs were not "
                                 "finite (never cached, never selected)", ["model"], registry=r)
        self.dataset_entries = _DatasetEntries()
        r.register(self.dataset_entries)

    MAX_JOBS = 1000

    def job_label(self, job_id: str) -> str:
        """The job label of an authenticated call: its job id, "_invalid" for an id that is
        not a valid name (never counted against the budget), or "_other" once ``MAX_JOBS``
        distinct ids have been seen (so that clients cannot grow the metrics without bound)."""
        if not is_valid_name(job_id):
            return "_invalid"
        job = job_id or "-"
        if job in self._jobs:
            return job
        if len(self._jobs) >= self.MAX_JOBS:
            return "_other"
        self._jobs.add(job)
        return job

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint in a background thread; returns the port it
        listens on (the kernel's choice when ``port`` is 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the /metrics endpoint (if it was started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (for tests and benchmarks), 0 if absent."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v
