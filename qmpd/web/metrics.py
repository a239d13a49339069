"""``/metrics``: Prometheus text format via ``prometheus-client``.

Two kinds of figures:

* counted as they happen, in the one dispatch place
  (:attr:`Daemon.request_observer <qmpd.server.daemon.Daemon.request_observer>`):
  QMP requests by command and outcome, and their latency histogram;
* read at scrape time from the domain (:class:`_DomainCollector`): clients,
  jobs by type and status, bytes copied, job throughput, dirty bytes per
  bitmap, bytes read and written per node, events emitted.  The hot paths
  pay nothing for these beyond the byte counters the nodes keep anyway.

Each server has its own :class:`~prometheus_client.CollectorRegistry`, so
several daemons in one process (tests) do not mix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qmpd.web.model import WebModel

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_FIRST_BUCKET = LATENCY_BUCKETS[0]


class _DomainCollector(Collector):
    def __init__(self, model: WebModel) -> None:
        self._model = model

    def collect(self) -> Iterator[Metric]:
        model = self._model
        clients = GaugeMetricFamily("qmpd_clients", "QMP clients connected", labels=["transport"])
        counts: dict[str, int] = {"socket": 0, "websocket": 0}
        for client in model.clients():
            counts[client["transport"]] = counts.get(client["transport"], 0) + 1
        for transport, n in sorted(counts.items()):
            clients.add_metric([transport], n)
        yield clients

        jobs = GaugeMetricFamily("qmpd_jobs", "Jobs the daemon holds, by type and status",
                                 labels=["type", "status"])
        by_status: dict[tuple[str, str], int] = {}
        progress = GaugeMetricFamily("qmpd_job_progress_bytes", "Bytes done of each job",
                                     labels=["id", "type"])
        total = GaugeMetricFamily("qmpd_job_total_bytes", "Bytes of work of each job",
                                  labels=["id", "type"])
        rate = GaugeMetricFamily("qmpd_job_throughput_bytes_per_second",
                                 "Current throughput of each job", labels=["id", "type"])
        copied = model.finished_bytes
        now = time.monotonic()
        for job in model.live_jobs():
            key = (job.job_type.value, job.status.value)
            by_status[key] = by_status.get(key, 0) + 1
            labels = [job.id, job.job_type.value]
            progress.add_metric(labels, job.progress.current)
            total.add_metric(labels, job.progress.total)
            rate.add_metric(labels, 0.0 if job.is_completed else model.job_rate(job, now))
            if job.status.value not in ("concluded", "null"):  # those are in finished_bytes
                copied += job.progress.current
        for key, n in sorted(by_status.items()):
            jobs.add_metric(list(key), n)
        yield jobs
        yield progress
        yield total
        yield rate
        yield CounterMetricFamily("qmpd_job_bytes_copied", "Bytes copied by jobs since start",
                                  value=copied)
        finished = CounterMetricFamily("qmpd_jobs_finished", "Jobs concluded since start",
                                       labels=["type", "outcome"])
        for (jtype, outcome), n in sorted(model.finished_counts.items()):
            finished.add_metric([jtype, outcome], n)
        yield finished

        dirty = GaugeMetricFamily("qmpd_bitmap_dirty_bytes", "Dirty bytes of each named bitmap",
                                  labels=["node", "bitmap"])
        read = CounterMetricFamily("qmpd_node_read_bytes", "Bytes read through each node",
                                   labels=["node", "driver"])
        written = CounterMetricFamily("qmpd_node_written_bytes", "Bytes written through each node",
                                      labels=["node", "driver"])
        for node in model.nodes(heat=False):
            read.add_metric([node["name"], node["driver"]], node["bytes_read"])
            written.add_metric([node["name"], node["driver"]], node["bytes_written"])
            for bm in node["bitmaps"]:
                dirty.add_metric([node["name"], bm["name"]], bm["count"])
        yield dirty
        yield read
        yield written

        events = CounterMetricFamily("qmpd_events", "QMP events emitted", labels=["event"])
        for name, n in sorted(model.event_counts.items()):
            events.add_metric([name], n)
        yield events


class _RequestStats:
    """Counts and latency buckets of one command: plain ints, no locks (the
    daemon runs one event loop; scrapes read them on the same loop)."""

    __slots__ = ("errors", "buckets", "total")

    def __init__(self) -> None:
        #: Failed requests by error class; the rest succeeded.
        self.errors: dict[str, int] = {}
        #: Non-cumulative: ``buckets[i]`` counts durations in
        #: (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]]; the last slot is +Inf.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def outcomes(self) -> dict[str, int]:
        """:return: requests by outcome (``ok`` or the error class)."""
        out = dict(self.errors)
        ok = sum(self.buckets) - sum(self.errors.values())
        if ok:
            out["ok"] = ok
        return out


class _RequestCollector(Collector):
    def __init__(self, stats: dict[str, _RequestStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("qmpd_qmp_requests", "QMP commands executed",
                                       labels=["command", "outcome"])
        latency = HistogramMetricFamily("qmpd_qmp_request_duration_seconds",
                                        "Time to execute a QMP command (waiting for the command lock included)",
                                        labels=["command"])
        for command, st in sorted(self._stats.items()):
            for outcome, n in sorted(st.outcomes().items()):
                requests.add_metric([command, outcome], n)
            running = 0
            cumulative = []
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), st.buckets):
                running += n
                cumulative.append((bound, running))
            latency.add_metric([command], cumulative, st.total)
        yield requests
        yield latency


class Metrics:
    """The registry of one web server; :meth:`observe_request` is the hook."""

    def __init__(self, model: WebModel) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats: dict[str, _RequestStats] = {}
        self.registry.register(_RequestCollector(self._stats))
        self.registry.register(_DomainCollector(model))

    def observe_request(self, command: str, outcome: str, seconds: float) -> None:
        """Count one executed command (called by the daemon's dispatcher; cheap)."""
        st = self._stats.get(command)
        if st is None:
            st = self._stats[command] = _RequestStats()
        if outcome != "ok":
            st.errors[outcome] = st.errors.get(outcome, 0) + 1
        st.buckets[0 if seconds <= _FIRST_BUCKET else bisect_left(LATENCY_BUCKETS, seconds)] += 1
        st.total += seconds

    def render(self) -> bytes:
        """:return: the text exposition."""
        return generate_latest(self.registry)
