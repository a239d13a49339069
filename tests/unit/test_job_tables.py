"""The job tables against QEMU's JobSTT/JobVerbTable (spec 3.1, 3.2), the
rate limiter's arithmetic, the manual clock and the job-id rule."""

from __future__ import annotations

import pytest

from qmpd.jobs import TRANSITIONS, VERBS, JobStatus, JobVerb, ManualClock, RateLimit, id_wellformed
from qmpd.jobs.errors import JobVerbError
from qmpd.jobs.status import check_verb, transition_allowed

# Copied from spec 3.1 / 3.2: rows and columns in QAPI order.
STT = """
undefined    0  1  0  0  0  0  0  0  0  0  0
created      0  0  1  0  0  0  0  0  1  0  1
running      0  0  0  1  1  0  1  0  1  0  0
paused       0  0  1  0  0  0  0  0  0  0  0
ready        0  0  0  0  0  1  1  0  1  0  0
standby      0  0  0  0  1  0  0  0  0  0  0
waiting      0  0  0  0  0  0  0  1  1  0  0
pending      0  0  0  0  0  0  0  0  1  1  0
aborting     0  0  0  0  0  0  0  0  1  1  0
concluded    0  0  0  0  0  0  0  0  0  0  1
null         0  0  0  0  0  0  0  0  0  0  0
"""
VERB_TABLE = """
cancel      0  1  1  1  1  1  1  1  0  0  0
pause       0  1  1  1  1  1  0  0  0  0  0
resume      0  1  1  1  1  1  0  0  0  0  0
set-speed   0  1  1  1  1  1  0  0  0  0  0
complete    0  0  0  0  1  1  0  0  0  0  0
finalize    0  0  0  0  0  0  0  1  0  0  0
dismiss     0  0  0  0  0  0  0  0  0  1  0
change      0  1  1  1  1  1  0  0  0  0  0
"""
COLUMNS = list(JobStatus)


def parse(table: str) -> dict[str, dict[JobStatus, bool]]:
    rows = {}
    for line in table.strip().splitlines():
        name, *bits = line.split()
        assert len(bits) == len(COLUMNS)
        rows[name] = {col: bit == "1" for col, bit in zip(COLUMNS, bits)}
    return rows


def test_enum_values_are_qapi_names() -> None:
    assert [s.value for s in JobStatus] == [
        "undefined", "created", "running", "paused", "ready", "standby",
        "waiting", "pending", "aborting", "concluded", "null",
    ]
    assert {v.value for v in JobVerb} == set(parse(VERB_TABLE))


def test_every_status_pair_against_jobstt() -> None:
    expected = parse(STT)
    assert set(TRANSITIONS) == set(JobStatus)
    checked = 0
    for old in JobStatus:
        for new in JobStatus:
            assert transition_allowed(old, new) is expected[old.value][new], (old, new)
            checked += 1
    assert checked == 121


def test_every_verb_status_pair_against_verb_table() -> None:
    expected = parse(VERB_TABLE)
    assert set(VERBS) == set(JobVerb)
    for verb in JobVerb:
        for status in JobStatus:
            allowed = expected[verb.value][status]
            assert (status in VERBS[verb]) is allowed, (verb, status)
            if allowed:
                check_verb("j", status, verb)
            else:
                with pytest.raises(JobVerbError) as info:
                    check_verb("j", status, verb)
                assert info.value.desc == (
                    f"Job 'j' in state '{status.value}' cannot accept command verb '{verb.value}'"
                )
                assert info.value.error_class == "GenericError"


@pytest.mark.parametrize(
    ("job_id", "ok"),
    [("job0", True), ("a", True), ("A-b.c_9", True), ("", False), ("0job", False),
     ("-x", False), ("job 0", False), ("jöb", False), ("job/0", False), ("x" * 300, True)],
)
def test_job_id_rule(job_id: str, ok: bool) -> None:
    assert id_wellformed(job_id) is ok


def test_ratelimit_quota_and_delays() -> None:
    lim = RateLimit()
    assert lim.calculate_delay(0, 1 << 30) == 0  # unlimited
    lim.set_speed(1)
    assert lim.slice_quota == 1  # max(0.1, 1)
    lim.set_speed(15)
    assert lim.slice_quota == 1  # 1.5 truncated
    lim.set_speed(10 * (1 << 20))
    assert lim.slice_quota == 1 << 20
    # first request opens a slice; charging the quota pushes the slice end
    assert lim.calculate_delay(0, 0) == 0
    assert lim.calculate_delay(0, 1 << 20) == 100_000_000
    assert lim.calculate_delay(5, 0) == 100_000_000 - 5
    assert lim.calculate_delay(100_000_000, 0) == 0  # slice end reached, not passed
    assert lim.calculate_delay(100_000_000, 1 << 20) == 100_000_000  # end = 200 ms
    # a slice that is over resets the accounting
    assert lim.calculate_delay(300_000_001, 100) == 0
    assert lim.dispatched == 100 and lim.slice_start_ns == 300_000_001


def test_ratelimit_speed_one_after_one_mib() -> None:
    lim = RateLimit()
    lim.set_speed(1)
    assert lim.calculate_delay(0, 0) == 0
    lim.calculate_delay(0, 1 << 20)
    assert lim.calculate_delay(0, 0) == (1 << 20) * 100_000_000


def test_ratelimit_non_integral_quota() -> None:
    lim = RateLimit()
    lim.set_speed(1 << 20)  # quota 104857 bytes
    assert lim.slice_quota == 104857
    lim.calculate_delay(0, 0)
    lim.calculate_delay(0, 1 << 20)
    assert lim.calculate_delay(0, 0) == int((1 << 20) / 104857 * 100_000_000)


def test_ratelimit_speed_change_keeps_slice() -> None:
    lim = RateLimit()
    lim.set_speed(10 << 20)
    lim.calculate_delay(0, 0)
    lim.calculate_delay(0, 1 << 20)
    lim.set_speed(20 << 20)  # quota 2 MiB: the charged MiB is now under quota
    assert lim.calculate_delay(10, 0) == 0
    lim.set_speed(5 << 20)  # quota 512 KiB: 2 slices' worth charged
    assert lim.calculate_delay(10, 0) == 200_000_000 - 10


def test_manual_clock() -> None:
    clock = ManualClock(start_ns=10)
    fired: list[tuple[str, int]] = []
    clock.call_later(100, lambda: fired.append(("a", clock.now_ns())))
    handle = clock.call_later(50, lambda: fired.append(("b", clock.now_ns())))
    clock.call_later(50, lambda: fired.append(("c", clock.now_ns())))
    handle.cancel()
    assert clock.next_deadline() == 60
    assert clock.advance(49) == 0
    assert clock.advance(1) == 1
    assert fired == [("c", 60)]
    assert clock.advance_to_next()
    assert fired[-1] == ("a", 110) and clock.now_ns() == 110
    assert not clock.advance_to_next()
