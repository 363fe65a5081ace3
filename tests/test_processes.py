"""Recognizing the very process Valor started: pid plus create time."""

from __future__ import annotations


def test_same_start_tolerates_the_kernels_boot_time_step_only():
    from servers.core.processes import same_start

    start = 1_795_675_021.37
    assert same_start(start, start)
    assert same_start(start, start + 1.0)  # boot time re-read after an NTP step
    assert same_start(start, start - 1.0)
    assert not same_start(start, start + 0.02)  # another start, two ticks later
    assert not same_start(start, start + 0.5)
    assert not same_start(start, start + 2.0)  # the pid was reused
