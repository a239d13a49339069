"""Event emission: :class:`EventBus` timestamps QAPI events and fans them out."""

from qmpd.events.bus import EventBus, EventSink

__all__ = ["EventBus", "EventSink"]
