"""A signal that arrives while a supervisor re-executes itself (USR2) is not lost.

``_reexec`` blocks the signals weft answers in the main thread, and the blocked mask
survives the exec; but a process-directed signal may go to another thread (the log
writer, the control socket, a server's), whose handler wrote its number to the
wakeup socket that the exec then closed. An outside check (2026-12-07) lost a
SIGTERM so, under load: the upgraded process served on, and only SIGKILL ended it.
Here the signal is sent exactly in that window (``os.execve`` wrapped), so the case
is certain, and the new image (a small script) says what reached it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: The new image: raise what the old one carried, then report what is pending.
NEW_IMAGE = textwrap.dedent(
    """
    import os, signal
    from weft_core._wakeup import raise_carried_signals
    carried = raise_carried_signals(os.environ)
    pending = sorted(signal.Signals(s).name for s in signal.sigpending())
    print("carried", [signal.Signals(s).name for s in carried], "pending", pending, flush=True)
    """
)

#: The old image: a supervisor's Wakeup, another thread alive, and a USR2's re-exec
#: with a SIGTERM sent to the process between the block and the exec.
OLD_IMAGE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from weft_core import _supervise
    from weft_core._signals import CONTROL_SIGNALS, STOP_SIGNALS
    from weft_core._wakeup import Wakeup

    real_execve = os.execve

    def execve_late(path, args, env):
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread blocks it: a thread takes it
        time.sleep(0.3)
        real_execve(path, args, env)

    os.execve = execve_late
    other = threading.Thread(target=threading.Event().wait, daemon=True)
    other.start()
    with Wakeup((*STOP_SIGNALS, *CONTROL_SIGNALS)):
        _supervise._reexec([sys.executable, "-c", sys.argv[1]], "{}")
    print("the exec failed", flush=True)
    """
)


@pytest.mark.timeout(60)
def test_a_sigterm_during_the_reexec_reaches_the_new_image() -> None:
    result = subprocess.run(
        [sys.executable, "-c", OLD_IMAGE, NEW_IMAGE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Raised again in the new image, where it stays pending (blocked since the exec)
    # until the supervisor's handlers are in.
    assert result.stdout.strip() == "carried ['SIGTERM'] pending ['SIGTERM']", (
        result.stdout,
        result.stderr,
    )


@pytest.mark.timeout(60)
def test_a_failed_reexec_gives_the_caught_signal_back_to_the_serving_loop() -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        from weft_core import _supervise
        from weft_core._signals import CONTROL_SIGNALS, STOP_SIGNALS
        from weft_core._wakeup import Wakeup

        def execve_fails(path, args, env):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            raise OSError(2, "No such file or directory")

        os.execve = execve_fails
        other = threading.Thread(target=threading.Event().wait, daemon=True)
        other.start()
        with Wakeup((*STOP_SIGNALS, *CONTROL_SIGNALS)) as wakeup:
            _supervise._reexec([sys.executable, "-c", "pass"], "{}")
            print("read", sorted(signal.Signals(s).name for s in wakeup.wait(5)), flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "read ['SIGTERM']" in result.stdout, (result.stdout, result.stderr)
