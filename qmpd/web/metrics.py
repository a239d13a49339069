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
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qmpd.web.model import WebModel

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


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


class Metrics:
    """The registry of one web server; :meth:`observe_request` is the hook."""

    def __init__(self, model: WebModel) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("qmpd_qmp_requests", "QMP commands executed",
                                 ["command", "outcome"], registry=self.registry)
        self._latency = Histogram("qmpd_qmp_request_duration_seconds",
                                  "Time to execute a QMP command (queueing included)",
                                  ["command"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_DomainCollector(model))
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_request(self, command: str, outcome: str, seconds: float) -> None:
        """Count one executed command (called by the daemon's dispatcher)."""
        key = (command, outcome)
        pair = self._children.get(key)
        if pair is None:
            pair = (self._requests.labels(command, outcome), self._latency.labels(command))
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def render(self) -> bytes:
        """:return: the text exposition."""
        return generate_latest(self.registry)
