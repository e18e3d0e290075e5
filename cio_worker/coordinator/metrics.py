"""The coordinator's figures in Prometheus's format, served at ``/metrics`` (prometheus_client).

Requests, claims and reports are counted where the coordinator answers them; a report once, when
the queue applies it (a copy resent after a lost answer is answered from the queue's record and
not counted again). Tasks and workers by state are read from the queue when scraped, at most once
a ``ttl``: however many scrape at once, that is one query a second. Each app has its own registry,
so two coordinators in one process count apart. What only agents know (bytes synced and
uploaded, drain times, each attempt's wall time and cost) comes with their final reports (the
figures of complete, fail, release): counted as the reports are applied, never read back from the
queue; a family has no samples until a report carries it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cio_worker.errors import CioError
from cio_worker.queue.base import AttemptFigures

log = logging.getLogger("cio_worker.coordinator")

Counts = tuple[dict[str, int], dict[str, int]]  # tasks by state, workers by state

# A claim is answered within milliseconds when work is there; a long poll lasts up to its wait.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
DRAIN_BUCKETS = (1, 2.5, 5, 10, 15, 20, 25, 30, 45, 60, 120)
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ATTEMPT_BUCKETS = (1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# Any other method a client makes up is counted as "other", so it cannot add series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class QueueCollector(Collector):
    """``cio_tasks{state}`` and ``cio_workers{state}`` from ``read()``, which runs at most once a
    ``ttl`` (a failure too is kept that long); ``cio_queue_readable`` is 0 while it fails."""

    def __init__(self, read: Callable[[], Counts], ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.ttl, self.clock = read, ttl, clock
        self.reads = 0  # queries made, for tests and figures
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._counts: Counts | None = None

    def counts(self) -> Counts | None:
        with self._lock:  # scrapes that arrive together wait for one read
            now = self.clock()
            if now - self._at >= self.ttl:
                self.reads += 1
                try:
                    self._counts = self.read()
                except CioError as exc:
                    log.warning("metrics: the queue's counts cannot be read: %s", exc)
                    self._counts = None
                self._at = now
            return self._counts

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        yield GaugeMetricFamily("cio_queue_readable", "1 when the queue answered the last count of tasks and workers",
                                value=0 if counts is None else 1)
        tasks = GaugeMetricFamily("cio_tasks", "tasks in the queue by state", labels=["state"])
        workers = GaugeMetricFamily("cio_workers", "registered workers by state (gone: silent too long)", labels=["state"])
        if counts is not None:
            for family, by_state in zip((tasks, workers), counts):
                for state, n in by_state.items():
                    family.add_metric([state], n)
        yield tasks
        yield workers

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cio_queue_readable", "")
        yield GaugeMetricFamily("cio_tasks", "", labels=["state"])
        yield GaugeMetricFamily("cio_workers", "", labels=["state"])


class ClaimTimer:
    """One claim's clock: request to lease, and the time it spent waiting in its long poll."""

    __slots__ = ("metrics", "started", "wait_seconds", "has_waited")

    def __init__(self, metrics: "CoordinatorMetrics") -> None:
        self.metrics, self.started, self.wait_seconds, self.has_waited = metrics, time.monotonic(), 0.0, False

    def waited(self, began: float) -> None:
        """A wait in the long poll, begun at ``began`` (monotonic), is over."""
        self.wait_seconds += time.monotonic() - began
        self.has_waited = True

    def leased(self) -> None:
        m = self.metrics
        m.claims_leased.inc()
        m.claim_seconds.observe(time.monotonic() - self.started)
        if self.has_waited:
            m.waits_leased.observe(self.wait_seconds)

    def empty(self) -> None:
        m = self.metrics
        m.claims_empty.inc()
        if self.has_waited:
            m.waits_empty.observe(self.wait_seconds)


class CoordinatorMetrics:
    """Every figure one coordinator app serves, in its own registry."""

    def __init__(self, read_counts: Callable[[], Counts], *, counts_ttl: float = 1.0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.queue = QueueCollector(read_counts, counts_ttl)
        r.register(self.queue)
        self.requests = Counter("cio_http_requests", "requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("cio_http_request_seconds", "time to answer a request, by route "
                                         "(a claim's includes its long poll)", ["route"], registry=r,
                                         buckets=LATENCY_BUCKETS)
        claims = Counter("cio_claims", "claims answered: a lease given, or none before the poll ended",
                         ["outcome"], registry=r)
        self.claims_leased, self.claims_empty = claims.labels("leased"), claims.labels("empty")
        self.claim_seconds = Histogram("cio_claim_seconds", "from a claim's arrival to the lease it was given, "
                                       "long-poll wait included", registry=r, buckets=LATENCY_BUCKETS)
        waits = Histogram("cio_claim_wait_seconds", "time a claim waited on the server for work, by how its "
                          "poll ended", ["outcome"], registry=r, buckets=WAIT_BUCKETS)
        self.waits_leased, self.waits_empty = waits.labels("leased"), waits.labels("empty")
        self.completions = Counter("cio_completions", "tasks reported done", registry=r)
        self.failures = Counter("cio_failures", "tasks reported failed, by outcome (retry: back to pending; "
                                "final: failed)", ["outcome"], registry=r)
        self.releases = Counter("cio_releases", "tasks given back by their agent, by cause (preempted, released) "
                                "and outcome (retry, final)", ["cause", "outcome"], registry=r)
        self.leases_expired = Counter("cio_leases_expired", "leases reaped after their agent went silent",
                                      registry=r)
        self.retries = Counter("cio_retries", "tasks sent back to pending by a report, by cause", ["cause"],
                               registry=r)
        for outcome in ("retry", "final"):
            self.failures.labels(outcome)
            for cause in ("preempted", "released"):
                self.releases.labels(cause, outcome)
        for cause in ("failed", "preempted", "released"):
            self.retries.labels(cause)
        # Only agents know these: from the figures their final reports carry.
        self.bytes_synced = Counter("cio_agent_bytes_synced", "bytes agents downloaded for their tasks, by "
                                    "storage scheme", ["scheme"], registry=r)
        self.bytes_uploaded = Counter("cio_agent_bytes_uploaded", "bytes of outputs agents uploaded, by storage "
                                      "scheme", ["scheme"], registry=r)
        self.drain_seconds = Histogram("cio_agent_drain_seconds", "from a stop (preemption notice, signal, kill) "
                                       "to the agent's report, by how the attempt ended", ["outcome"], registry=r,
                                       buckets=DRAIN_BUCKETS)
        self.attempt_seconds = Histogram("cio_attempt_wall_seconds", "wall time of attempts on their agents, by "
                                         "how they ended", ["outcome"], registry=r, buckets=ATTEMPT_BUCKETS)
        self.attempt_cost = Counter("cio_attempt_cost", "what attempts cost (wall time x the instance type's "
                                    "hourly price), by currency", ["currency"], registry=r)
        self.attempts_unpriced = Counter("cio_attempts_unpriced", "attempts whose instance type the price table "
                                         "does not know (their cost is not in cio_attempt_cost)", registry=r)
        # Filled only where the coordinator paces Python's collector (``PacedCollector``, in ``serve``).
        self.gc_pause_seconds = Histogram("cio_gc_pause_seconds", "garbage collections run by the coordinator and "
                                          "how long each stopped its event loop, by generation (0: young, 2: "
                                          "full)", ["generation"], registry=r, buckets=GC_BUCKETS)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method if method in METHODS else "other", status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(key[0], key[1], str(status)),
                                                      self.request_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def gc_pause(self, generation: int, seconds: float) -> None:
        self.gc_pause_seconds.labels(str(generation)).observe(seconds)

    def claim(self) -> ClaimTimer:
        return ClaimTimer(self)

    def failed(self, state: str) -> None:
        self.failures.labels("retry" if state == "pending" else "final").inc()
        if state == "pending":
            self.retries.labels("failed").inc()

    def released(self, cause: str, state: str) -> None:
        self.releases.labels(cause, "retry" if state == "pending" else "final").inc()
        if state == "pending":
            self.retries.labels(cause).inc()

    def attempt(self, outcome: str, figures: AttemptFigures | None) -> None:
        """An attempt ended (a report was applied now) with these figures (None: the agent sent
        none). Call it once per report: not for a copy resent after a lost answer, which the queue
        answers as a replay (``ReportOutcome.replay``) without recording it again."""
        if figures is None:
            return
        scheme = figures.storage_scheme or "unknown"
        if figures.sync_bytes:
            self.bytes_synced.labels(scheme).inc(figures.sync_bytes)
        if figures.upload_bytes:
            self.bytes_uploaded.labels(scheme).inc(figures.upload_bytes)
        if figures.drain_seconds is not None:
            self.drain_seconds.labels(outcome).observe(figures.drain_seconds)
        if figures.wall_seconds is not None:
            self.attempt_seconds.labels(outcome).observe(figures.wall_seconds)
            if figures.cost is not None:
                self.attempt_cost.labels(figures.currency or "unknown").inc(figures.cost)
            else:
                self.attempts_unpriced.inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for (``Accept``): the body and its content type. Reads
        the queue (through the cache): call it from a worker thread."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
