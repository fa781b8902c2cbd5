"""Handlers for tests/test_workers_reuse_port_edges.py, imported by ``weft serve`` workers.

``_serving``'s handlers (pid line, then echo), with two faults on demand:

- while the file named by ``PROBE_CRASH_FLAG`` exists, the import ends the
  process with status 3: a worker that crash-loops at start;
- a worker that inherited the listening socket whose inode the file named by
  ``PROBE_BROKEN_INODE`` holds fails to import (ImportError: weft serve exits 2),
  as new code broken for one worker slot only would; the other slots' workers then
  take a second to import, so that the broken one fails before any is ready.
"""

from __future__ import annotations

import os
import time

_flag = os.environ.get("PROBE_CRASH_FLAG")
if _flag and os.path.exists(_flag):
    os._exit(3)


def _holds(inode: str) -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{inode}]":
                return True
        except OSError:
            pass
    return False


_broken = os.environ.get("PROBE_BROKEN_INODE")
if _broken and os.path.exists(_broken):
    with open(_broken) as _file:
        if _holds(_file.read().strip()):
            raise ImportError("broken for this worker slot (a test's fault)")
    # The other slots' new code imports slowly: the broken slot fails first, before
    # any new worker is ready.
    time.sleep(1.0)

from _serving import handle, handle_async  # noqa: E402

__all__ = ["handle", "handle_async"]
