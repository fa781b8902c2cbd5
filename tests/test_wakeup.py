"""The main thread's wait for signals (``weft_core._wakeup``): nothing wakes it late."""

from __future__ import annotations

import signal
import threading

import pytest

from weft_core._wakeup import Wakeup

pytestmark = pytest.mark.timeout(20)


def test_a_signal_caught_by_another_thread_ends_the_wait_and_is_named() -> None:
    with Wakeup([signal.SIGUSR1, signal.SIGUSR2]) as wakeup:
        catcher = threading.Thread(
            target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        )
        catcher.start()
        catcher.join()
        assert wakeup.wait(None) == [signal.SIGUSR2]


def test_signals_received_while_busy_are_all_reported_by_the_next_wait() -> None:
    with Wakeup([signal.SIGUSR1, signal.SIGUSR2]) as wakeup:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR2)
        assert wakeup.wait(None) == [signal.SIGUSR1, signal.SIGUSR2]
        assert wakeup.wait(0) == []  # read once, reported once


def test_wake_from_another_thread_ends_the_wait_with_no_signal() -> None:
    with Wakeup([signal.SIGUSR1]) as wakeup:
        threading.Thread(target=wakeup.wake).start()
        assert wakeup.wait(None) == []


def test_leaving_puts_back_the_handlers_and_the_wakeup_fd() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGUSR1, mine)
    try:
        with Wakeup([signal.SIGUSR1]):
            assert signal.getsignal(signal.SIGUSR1) is not mine
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.set_wakeup_fd(-1) == -1  # none was set before, none is left
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_leaving_gives_a_signal_in_on_exit_the_handler_named_there() -> None:
    """weft serve leaves QUIT ignored once its stop has ended: a late one cuts nothing."""
    before = signal.getsignal(signal.SIGUSR2)
    try:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        with Wakeup([signal.SIGUSR2, signal.SIGUSR1], on_exit={signal.SIGUSR2: signal.SIG_IGN}):
            pass
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the others as they were
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_with_no_signals_it_works_outside_the_main_thread() -> None:
    got: list[list[int]] = []

    def waiter() -> None:
        with Wakeup() as wakeup:
            wakeup.wake()
            got.append(wakeup.wait(None))

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join()
    assert got == [[]]


def test_one_entered_inside_another_takes_the_signals_it_caught_unread() -> None:
    """A process changing roles (one weft serve becoming a supervisor) enters a new
    Wakeup while the old one holds a TERM nobody read: the new one reports it, not
    what it does not handle, nor the old one's wake-ups."""
    with Wakeup([signal.SIGUSR1, signal.SIGUSR2]) as outer:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR2)
        outer.wake()
        with Wakeup([signal.SIGUSR1]) as inner:
            assert inner.wait(0) == [signal.SIGUSR1]
            signal.raise_signal(signal.SIGUSR1)
            assert inner.wait(0) == [signal.SIGUSR1]
        assert outer.wait(0) == []
