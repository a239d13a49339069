"""The rate limiter of spec 4.4 step 5, in 100 ms slices (pure; no clock).

Quota per slice = ``max(speed * slice, 1)`` bytes (truncated to an integer).
Bytes are charged into the current slice; once the charged total reaches the
quota, the next request must wait until ``slice_start + charged/quota *
slice``.  A slice that ended resets the accounting.  Worked example at
``speed=1`` (quota 1 byte), ``now=0``::

    lim = RateLimit(); lim.set_speed(1)
    lim.calculate_delay(0, 0)        -> 0   (new slice [0, 100ms))
    lim.calculate_delay(0, 1 << 20)  -> ... (1 MiB charged; the job ignores it)
    lim.calculate_delay(0, 0)        -> 1048576 * 100ms (wait that long)

Changing the speed keeps the current slice and charged bytes, so a new speed
applies to the bytes already charged the next time a delay is computed.
"""

from __future__ import annotations

__all__ = ["RateLimit", "SLICE_NS"]

#: Slice length (QEMU's BLOCK_COPY_SLICE_TIME / BLOCK_JOB_SLICE_TIME): 100 ms.
SLICE_NS = 100_000_000


class RateLimit:
    """Byte-rate accounting in time slices."""

    def __init__(self) -> None:
        self.slice_start_ns = 0
        self.slice_end_ns = 0
        #: Bytes allowed per slice; 0 = no limit.
        self.slice_quota = 0
        self.slice_ns = SLICE_NS
        #: Bytes charged in the current (possibly extended) slice.
        self.dispatched = 0

    def set_speed(self, speed: int, slice_ns: int = SLICE_NS) -> None:
        """Set the rate in bytes per second; 0 disables limiting."""
        self.slice_ns = slice_ns
        if speed == 0:
            self.slice_quota = 0
        else:
            self.slice_quota = max(speed * slice_ns // 1_000_000_000, 1)

    def calculate_delay(self, now_ns: int, nbytes: int) -> int:
        """Charge ``nbytes`` at ``now_ns``.

        :return: nanoseconds the *next* request must wait (0 = go on).
        """
        if not self.slice_quota:
            return 0
        if self.slice_end_ns < now_ns:
            # The previous (possibly extended) slice is over: start afresh.
            self.slice_start_ns = now_ns
            self.slice_end_ns = now_ns + self.slice_ns
            self.dispatched = 0
        self.dispatched += nbytes
        if self.dispatched < self.slice_quota:
            return 0
        delay_slices = self.dispatched / self.slice_quota
        self.slice_end_ns = self.slice_start_ns + int(delay_slices * self.slice_ns)
        return self.slice_end_ns - now_ns
