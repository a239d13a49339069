"""What the dashboard and ``/metrics`` show, read from the domain objects.

:class:`WebModel` subscribes to the daemon's EventBus (last events, events
per name, finished jobs) and builds snapshots on demand from the job
manager and the block graph.  It never changes state.  Job throughput is
measured here: each sample of a job's ``current-progress`` at least
:data:`RATE_WINDOW` seconds after the previous one updates an exponentially
smoothed rate, so the dashboard and the metrics agree.

A snapshot, abridged::

    {"jobs": [{"id": "job0", "type": "backup", "status": "running",
               "current": 1048576, "total": 67108864, "speed": 0,
               "rate": 52428800.0, "eta": 1.26, "finished": false}],
     "nodes": [{"name": "drive0", "driver": "raw", "children": {"file": "#block123"},
                "bitmaps": [{"name": "b0", "count": 65536, "granularity": 65536,
                             "heat": [0.0, 1.0, ...]}]}],
     "backends": [{"name": "drive0", "root": "disk0", "io_status": "ok",
                   "device": {"id": "vda", "model": "virtio-blk-pci",
                              "path": "/machine/peripheral/vda", "qdev": ".../virtio-backend"}}],
     "devices": [{"id": "vda", "model": "virtio-blk-pci", "path": "/machine/peripheral/vda",
                  "backend": "drive0"}],
     "events": [...], "clients": [...]}

Guest devices and BlockBackends come from ``machine/`` (the ``-drive`` and
``-device`` options); an anonymous backend (``-device ...,drive=NODE``) has
the name ``""``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.events.names import JOB_STATUS_CHANGE

if TYPE_CHECKING:
    from qmpd.jobs.job import Job
    from qmpd.server.daemon import Daemon

__all__ = ["WebModel", "JobRate", "HEAT_BUCKETS", "RATE_WINDOW"]

#: Cells of a bitmap's heat strip.
HEAT_BUCKETS = 128
#: Minimum seconds between two throughput samples of one job.
RATE_WINDOW = 0.25
#: Events and finished jobs kept for the dashboard.
MAX_EVENTS = 50
MAX_FINISHED = 20


@dataclass(slots=True)
class JobRate:
    """Throughput of one job, from samples of its progress."""

    started: float
    last_time: float
    last_bytes: int
    rate: float = 0.0

    def sample(self, now: float, current: int) -> float:
        """Update with the progress at ``now``; :return: bytes/s (smoothed)."""
        dt = now - self.last_time
        if dt >= RATE_WINDOW:
            inst = max(0, current - self.last_bytes) / dt
            self.rate = inst if self.rate == 0.0 else 0.5 * self.rate + 0.5 * inst
            self.last_time, self.last_bytes = now, current
        return self.rate


class WebModel:
    """Read-only view of one daemon for the web layer."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        #: Events emitted since start, by name.
        self.event_counts: collections.Counter[str] = collections.Counter()
        self.finished: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_FINISHED)
        #: Jobs concluded since start, by (type, outcome); bytes they copied.
        self.finished_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.finished_bytes = 0
        self._rates: dict[str, JobRate] = {}
        #: Extra clients (WebSocket sessions): name -> description.
        self.web_clients: dict[str, dict[str, Any]] = {}
        #: Set by every event; the live feed clears it when it pushes.
        self.changed = True
        self._unsubscribe = daemon.events.subscribe(self._on_event)

    def close(self) -> None:
        """Stop listening to events."""
        self._unsubscribe()

    # -- events -------------------------------------------------------------
    def _on_event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        self.event_counts[msg["event"]] += 1
        self.changed = True
        if msg["event"] == JOB_STATUS_CHANGE and msg["data"]["status"] == "concluded":
            jobs = self._daemon.state.jobs
            job = jobs.get(msg["data"]["id"]) if jobs is not None else None
            if job is not None:
                self._record_finished(job)

    def _record_finished(self, job: Job) -> None:
        now = time.monotonic()
        rate = self._rates.pop(job.id, None)
        elapsed = now - rate.started if rate is not None else 0.0
        error = job.error_text()
        outcome = "cancelled" if job.is_cancelled else ("failed" if error else "completed")
        entry = self._job_entry(job, now)
        entry.update(finished=True, outcome=outcome, elapsed=elapsed,
                     rate=job.progress.current / elapsed if elapsed > 0 else 0.0, eta=None)
        self.finished.appendleft(entry)
        self.finished_counts[(job.job_type.value, outcome)] += 1
        self.finished_bytes += job.progress.current

    # -- jobs ---------------------------------------------------------------
    def live_jobs(self) -> list[Job]:
        """:return: the jobs the manager still holds."""
        jobs = self._daemon.state.jobs
        return list(jobs.jobs) if jobs is not None else []

    def job_rate(self, job: Job, now: float) -> float:
        """:return: ``job``'s current throughput in bytes/s."""
        current = job.progress.current
        rate = self._rates.get(job.id)
        if rate is None:
            self._rates[job.id] = JobRate(now, now, current)
            return 0.0
        return rate.sample(now, current)

    def _job_entry(self, job: Job, now: float) -> dict[str, Any]:
        current, total = job.progress.current, job.progress.total
        return {
            "id": job.id, "type": job.job_type.value, "status": job.status.value,
            "current": current, "total": total, "speed": job.speed,
            "paused": job.pause_count > 0, "error": job.error_text(), "finished": False,
        }

    def jobs(self, now: float | None = None) -> list[dict[str, Any]]:
        """:return: live jobs (with rate and ETA), then recently finished ones."""
        now = time.monotonic() if now is None else now
        out = []
        for job in self.live_jobs():
            entry = self._job_entry(job, now)
            rate = self.job_rate(job, now) if not job.is_completed else 0.0
            left = entry["total"] - entry["current"]
            entry["rate"] = rate
            entry["eta"] = left / rate if rate > 0 and left > 0 else None
            out.append(entry)
        live = {e["id"] for e in out}
        out.extend(e for e in self.finished if e["id"] not in live)
        return out

    # -- block graph ----------------------------------------------------------
    def nodes(self, heat: bool = True) -> list[dict[str, Any]]:
        """:return: every node with its children and named bitmaps."""
        graph = self._daemon.state.block
        if graph is None:
            return []
        out = []
        for node in graph:
            bitmaps = []
            for bm in node.bitmaps:
                if bm.name is None:
                    continue
                entry: dict[str, Any] = {
                    "name": bm.name, "count": bm.count, "granularity": bm.granularity,
                    "recording": bm.recording, "busy": bm.busy, "size": bm.size,
                }
                if heat:
                    entry["heat"] = [round(x, 3) for x in bm.hbitmap.density(HEAT_BUCKETS)]
                bitmaps.append(entry)
            out.append({
                "name": node.node_name, "driver": node.drv, "file": node.driver.filename,
                "size": node.length, "filter": node.driver.is_filter, "read_only": node.read_only,
                "backend": node.backend, "auto_named": node.auto_named,
                "children": {role: child.node_name for role, child in node.children.items()},
                "bytes_read": node.bytes_read, "bytes_written": node.bytes_written,
                "bitmaps": bitmaps,
            })
        return out

    # -- guest devices and BlockBackends -------------------------------------
    def backends(self) -> list[dict[str, Any]]:
        """:return: every BlockBackend (creation order) with its root node and device."""
        machine = self._daemon.state.machine
        if machine is None:
            return []
        out = []
        for b in machine.backends:
            dev = b.device
            out.append({
                "name": b.name, "root": b.root.node_name if b.root is not None else None,
                "io_status": b.io_status, "removable": b.removable,
                "device": None if dev is None else {
                    "id": dev.id, "model": dev.model.name, "path": dev.path, "qdev": dev.qdev},
            })
        return out

    def devices(self) -> list[dict[str, Any]]:
        """:return: every guest device (``-device`` order, implicit ones included)."""
        machine = self._daemon.state.machine
        if machine is None:
            return []
        return [{"id": d.id, "model": d.model.name, "path": d.path,
                 "backend": d.backend.name if d.backend is not None else None}
                for d in machine.devices]

    # -- clients --------------------------------------------------------------
    def clients(self) -> list[dict[str, Any]]:
        """:return: QMP clients: socket connections, then WebSocket sessions."""
        out: list[dict[str, Any]] = [
            {"name": conn.name, "transport": "socket", "negotiating": conn.negotiating}
            for conn in self._daemon.connections
        ]
        out.extend(self.web_clients.values())
        return out

    def snapshot(self) -> dict[str, Any]:
        """:return: everything the dashboard shows."""
        return {
            "jobs": self.jobs(),
            "nodes": self.nodes(),
            "backends": self.backends(),
            "devices": self.devices(),
            "events": list(self.events)[-20:][::-1],
            "clients": self.clients(),
            "name": self._daemon.config.name,
        }
