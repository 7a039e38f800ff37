"""`duplex up`'s restart policy (the whole launcher runs in tests/test_end_to_end.py)."""

import signal

from duplex.launcher import Backoff, describe_exit


def test_restart_delay_doubles_to_a_cap_and_starts_over_after_a_long_run():
    backoff = Backoff(first=0.5, maximum=10.0, reset_after=30.0)
    assert [backoff.next_delay(ran_seconds=1.0) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.next_delay(ran_seconds=29.9) == 10.0
    assert backoff.next_delay(ran_seconds=30.0) == 0.5  # it stayed up a while: a new crash is a fresh start
    assert backoff.next_delay(ran_seconds=0.1) == 1.0


def test_an_exit_reads_as_its_code_or_its_signal():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
