"""Running ``wrk`` (Debian's package) on the client core and parsing its ``--latency`` output."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from .procs import client_preexec

MISSING = (
    "wrk is not installed: the keep-alive and churn figures need it. On Debian or "
    "Ubuntu: `sudo apt-get install wrk` (this harness installs nothing by itself). "
    "Or run only the other measurements: --only idle,stop"
)

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = re.compile(r"([\d.]+)(us|ms|s|m|h)$")


class WrkError(RuntimeError):
    """wrk failed or printed something we cannot read."""


def find() -> str | None:
    return shutil.which("wrk")


def version(path: str) -> str:
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "?"


def to_ms(text: str) -> float:
    match = _TIME.match(text.strip())
    if not match:
        raise WrkError(f"cannot read a time from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), request count and error counts from wrk's output."""
    out: dict[str, Any] = {}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:
        raise WrkError("no Requests/sec in wrk's output:\n" + text)
    out["rps"] = float(rps.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M):
        out[f"p{pct}_ms"] = to_ms(value)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+\w+)", text, re.M)
    if total:
        out["requests"] = int(total.group(1))
        out["seconds"] = to_ms(total.group(2)) / 1e3
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    out["errors"] = dict(
        zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        if errors
        else {}
    )
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["errors"]["non2xx"] = int(bad.group(1)) if bad else 0
    return out


def run(
    path: str,
    port: int,
    connections: int,
    seconds: float,
    *,
    close: bool = False,
    timeout_s: int = 10,
) -> dict[str, Any]:
    """One wrk run (one thread, on the client core) against ``http://127.0.0.1:port/``.

    ``close`` sends ``Connection: close``: one request per connection (the churn test).
    """
    argv = [
        path,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "--latency",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + timeout_s + 30,
        preexec_fn=client_preexec,
        check=False,
    )
    if proc.returncode != 0:
        raise WrkError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    result = parse(proc.stdout)
    result["argv"] = argv
    return result
