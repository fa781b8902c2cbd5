"""``python -m benchmarks profile``: where a weft server spends its time under wrk load.

The weft server and then the raw one run under ``py-spy record`` (``pip install
py-spy``; nothing is installed by this script) while ``wrk`` loads them. Each
sample is charged to the innermost frame that belongs to weft (``weft_core`` or a
``weft_*`` plugin) or to the handler (``benchmarks/handlers.py``); anything below
the handler (socket calls the handler makes) counts as the handler's, and samples
with neither, or with an event loop's scheduler nearer the leaf, are the runtime's
(the loop, thread start-up, accept, scheduling). The
weft-attributed functions are weft's own overhead: the hot spots to look at.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from . import wrk
from .procs import ServerProcess, client_preexec
from .server import RAW_BACKENDS, installed_flavour

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+):(?P<line>\d+)\)$")
#: Event-loop frames: what runs below them belongs to the loop, not to the weft code
#: that started the loop (weft_trio's loop thread, for instance).
LOOP_FRAMES = (
    ("trio/_core/_run.py", "run"),
    ("trio/_core/_run.py", "unrolled_run"),
    ("gevent/hub.py", "Hub.run"),
    ("asyncio/base_events.py", "BaseEventLoop._run_once"),
)


def owner(path: str) -> str | None:
    if "weft_core/" in path or re.search(r"weft_[a-z]+/", path):
        return "weft"
    if path.endswith("benchmarks/handlers.py"):
        return "handler"
    return None


def attribute(raw_text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(samples per category, samples per weft function, total) from py-spy's raw output."""
    categories: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        category = "runtime"
        for frame in reversed(stack.split(";")):
            match = FRAME.match(frame)
            if not match:
                continue
            if any(match["file"].endswith(f) and match["func"] == fn for f, fn in LOOP_FRAMES):
                break
            who = owner(match["file"])
            if who == "handler":
                category = "handler"
                break
            if who == "weft":
                category = "weft"
                short = re.sub(r"^.*?((weft_core|weft_\w+)/)", r"\1", match["file"])
                functions[f"{short}:{match['func']}"] += count
                break
        categories[category] += count
    return categories, functions, total


def _record(pyspy: str, server: ServerProcess, wrk_path: str, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        load = threading.Thread(
            target=wrk.run,
            args=(wrk_path, server.port, args.connections, args.seconds + 2),
            kwargs={"close": args.churn},
        )
        load.start()
        subprocess.run(
            [
                pyspy,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            capture_output=True,
            check=True,
            preexec_fn=client_preexec,
        )
        load.join()
        return out.read_text()


def profile(args: argparse.Namespace) -> int:
    pyspy = shutil.which("py-spy")
    wrk_path = wrk.find()
    if pyspy is None or wrk_path is None:
        print("profile needs py-spy (pip install py-spy) and wrk (apt-get install wrk)")
        return 2
    flavour = installed_flavour(args.manager)
    if flavour is None:
        return 2
    log = Path(tempfile.gettempdir()) / "weft-bench-profile.log"
    load = f"{args.connections} conns" + (", churn" if args.churn else ", keep-alive")
    for backend, name in (("weft", f"weft {args.manager}"), ("raw", RAW_BACKENDS[flavour])):
        with ServerProcess(
            backend, args.manager if backend == "weft" else flavour, "http", log
        ) as server:
            wrk.run(wrk_path, server.port, args.connections, 1, close=args.churn)  # warm up
            categories, functions, total = attribute(_record(pyspy, server, wrk_path, args))
        print(f"\n{name}, {load}: {total} samples")
        for category in ("handler", "weft", "runtime"):
            print(f"  {category:<8} {100 * categories[category] / max(1, total):5.1f}%")
        if backend == "weft":
            print("  weft's own time by function (innermost weft frame):")
            for function, count in functions.most_common(args.top):
                print(f"    {100 * count / max(1, total):5.1f}%  {function}")
    return 0
