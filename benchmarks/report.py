"""Results: the machine description, medians, the Markdown table, JSON and the plot."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import cpu_ticks
from .server import RAW_BACKENDS
from .suites import IDLE_RUNS
from .workers import CONNECTIONS as WORKERS_CONNECTIONS
from .workers import LAYOUTS

DISTRIBUTIONS = (
    "weft-core",
    "weft-threads",
    "weft-gevent",
    "weft-trio",
    "weft-asyncio",
    "gevent",
    "greenlet",
    "trio",
    "uvloop",
    "matplotlib",
)
#: What a full run extrapolates idle memory to (one server process cannot hold it).
PROJECT_TO = 100_000
#: ratio targets (issues 15 and 17): (suite, metric, setting) -> (comparison, bound)
RATIO_TARGETS: dict[tuple[str, str, str | None], tuple[str, float]] = {
    ("throughput", "rps", None): (">=", 0.95),
    ("throughput", "p99_ms", None): ("<=", 1.1),
    ("churn", "rps", None): (">=", 0.95),
}
#: A manager's own ratio targets, before :data:`RATIO_TARGETS` (issue 17).
MANAGER_RATIO_TARGETS: dict[tuple[str, str, str], tuple[str, float]] = {
    ("threads", "churn", "rps"): (">=", 1.5),
    ("gevent", "churn", "rps"): (">=", 1.0),
}
#: A manager's own targets at one setting, before both (issue 17: p99 "no worse than
#: raw" for threads at 100 and 1,000 connections, and for trio at 1,000).
MANAGER_SETTING_TARGETS: dict[tuple[str, str, str, str], tuple[str, float]] = {
    ("threads", "throughput", "p99_ms", "c=100"): ("<=", 1.0),
    ("threads", "throughput", "p99_ms", "c=1000"): ("<=", 1.0),
    ("trio", "throughput", "p99_ms", "c=1000"): ("<=", 1.0),
}
TIMES = "\u00d7"  # the multiplication sign
IDLE_TARGET_KIB = 8.0
#: Managers whose idle memory per connection must not exceed their raw backend's
#: (issue 15 for asyncio and uvloop, issue 17 item 3 for trio), not just IDLE_TARGET_KIB.
IDLE_RATIO_MANAGERS = {"trio", "asyncio", "asyncio-uvloop"}
#: Thread-per-connection managers have no memory target: they must hold this many
#: idle connections, with the thread stack size the report states.
THREAD_MANAGERS = {"threads", "threads-nocache", "pool"}
THREADS_IDLE_TARGET = 10_000
STOP_TARGET_S = {"threads": 1.0, "threads-nocache": 1.0, "pool": 1.0}
STOP_TARGET_DEFAULT_S = 0.5
RATIO_LIMITS = (0.25, 4.0)
#: Share of CPU time used by others, with the benchmark idle, above which the report
#: says the machine was busy; and how long that is sampled.
BUSY_FRACTION = 0.10
BUSY_SAMPLE = 1.0
#: Cores' worth of CPU that other processes may use during a figure's runs before
#: the report marks its verdict as measured beside others' load (a fifth of the
#: server's core).
BUSY_CORES = 0.20
RATIO_TICKS = (0.25, 0.5, 0.8, 0.9, 1, 1.2, 1.5, 2, 3, 4)


# -- machine -------------------------------------------------------------------------------


def machine(wrk_version: str | None) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "wrk": wrk_version,
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        # Every thread-per-connection server here (weft threads, socketserver) uses the
        # default thread stack: glibc makes it RLIMIT_STACK (virtual; RSS counts the
        # pages a thread touches).
        "thread_stack": resource.getrlimit(resource.RLIMIT_STACK)[0],
        "loadavg_start": loadavg(),
        "busy_start": cpu_busy(),
    }


def cpu_busy(seconds: float = BUSY_SAMPLE) -> float | None:
    """Share of all cores' time spent busy over ``seconds`` (from ``/proc/stat``)."""
    try:
        busy0, total0 = cpu_ticks()
        time.sleep(seconds)
        busy1, total1 = cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def _stack(size: int | None) -> str:
    if size is None:
        return "?"
    if size == resource.RLIM_INFINITY:
        return "unlimited (glibc default 2 MiB)"
    return f"{size / 2**20:g} MiB virtual (RLIMIT_STACK, the default)"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    load = info.get("loadavg_start"), info.get("loadavg_end")
    busy = [info.get("busy_start"), info.get("busy_end")]
    shown = " / ".join("?" if b is None else f"{b:.0%}" for b in busy)
    return (
        f"{info['cpu']}, {info['cores']} cores; {info['python']}; {info['kernel']}; "
        f"{info['wrk'] or 'wrk not found'}; {versions}; fd limit {info['nofile'][0]}; "
        f"thread stack {_stack(info.get('thread_stack'))}; "
        f"load average at start/end {load[0]} / {load[1]}; CPU busy with others before/after "
        f"{shown}"
    )


# -- medians -------------------------------------------------------------------------------


def median(records: Iterable[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def select(records: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


@dataclass
class Row:
    manager: str
    metric: str
    setting: str
    weft: float | str | None
    raw: float | str | None
    unit: str
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    #: [lowest, highest] of the per-pair ratios whose median is ``ratio``.
    spread: list[float] | None = None
    #: The most CPU, in cores, that other processes used during any of the figure's
    #: runs (weft's or raw's); None where not measured (older runs, no wall clock).
    others: float | None = None


def _compare(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def summarise(records: list[dict[str, Any]], managers: list[str]) -> list[Row]:
    rows: list[Row] = []
    for manager in managers:
        rows += _wrk_rows(records, manager, "throughput", "keep-alive req/s", "rps", "req/s")
        rows += _wrk_rows(records, manager, "throughput", "p50 latency", "p50_ms", "ms")
        rows += _wrk_rows(records, manager, "throughput", "p99 latency", "p99_ms", "ms")
        rows += _wrk_rows(records, manager, "churn", "churn conn/s", "rps", "conn/s")
        for suite, per in (("throughput", "request"), ("churn", "conn")):
            rows += _wrk_rows(
                records, manager, suite, f"server CPU per {per}", "server_cpu_us", "µs"
            )
            rows += _wrk_rows(
                records, manager, suite, f"server cores busy ({suite})", "server_cores", "cores"
            )
        rows += _instruction_rows(records, manager)
        rows += _idle_rows(records, manager)
        rows += _stop_rows(records, manager)
    return rows


def _settings(records: list[dict[str, Any]], **where: Any) -> list[str]:
    seen: dict[str, None] = {}
    for r in select(records, **where):
        seen.setdefault(r["setting"], None)
    return sorted(seen, key=_order)


def _order(setting: str) -> float:
    value = setting.split("=")[1]
    return float("inf") if value == "max" else int(value)


def _wrk_rows(
    records: list[dict[str, Any]], manager: str, suite: str, metric: str, key: str, unit: str
) -> list[Row]:
    rows = []
    for setting in _settings(records, suite=suite, manager=manager):
        weft, raw, ref = (
            _wrk_value(
                select(records, suite=suite, manager=manager, impl=impl, setting=setting), key
            )
            for impl in ("weft", "raw", "asyncio")
        )
        if ref is not None:
            weft, raw = ref, None
        numbers = isinstance(weft, float | int) and isinstance(raw, float | int)
        ratio, spread = (
            _paired_ratio(records, suite=suite, manager=manager, setting=setting, key=key)
            if numbers and raw
            else (None, None)
        )
        target = (
            MANAGER_SETTING_TARGETS.get((manager, suite, key, setting))
            or MANAGER_RATIO_TARGETS.get((manager, suite, key))
            or RATIO_TARGETS.get((suite, key, setting))
            or RATIO_TARGETS.get((suite, key, None))
        )
        if weft is None and raw is None:
            continue  # a figure this run did not record (server CPU before 12-05)
        label = f"{setting[2:]} conns" + (", 1 req/conn" if suite == "churn" else "")
        row = Row(manager, metric, label, weft, raw, unit, ratio, spread=spread)
        row.others = most_others(select(records, suite=suite, manager=manager, setting=setting))
        if target and ref is None:
            row.target = f"{target[0].replace('>=', '≥').replace('<=', '≤')}{target[1]}{TIMES} raw"
            row.ok = False if weft == "failed" else _compare(ratio, *target)
        rows.append(row)
    return rows


def most_others(records: Iterable[dict[str, Any]]) -> float | None:
    """The most CPU (cores) other processes used during any of ``records``' runs."""
    seen = [r["others_cores"] for r in records if r.get("others_cores") is not None]
    return max(seen) if seen else None


def _paired_ratio(
    records: list[dict[str, Any]], *, key: str, **where: Any
) -> tuple[float | None, list[float] | None]:
    """The median over runs of weft/raw, each weft run paired with the raw run after it,
    and [lowest, highest] of those per-pair ratios.

    The two sides are measured alternately, so a pair shares the machine's state of
    the moment; the ratio within a pair cancels what drifts over a long run (other
    tenants of the host, frequency changes), which a ratio of the two medians does
    not. (None, None) without a complete pair.
    """
    weft: dict[int, float | None] = {
        r["run"]: r.get(key) for r in select(records, impl="weft", **where)
    }
    raw: dict[int, float | None] = {
        r["run"]: r.get(key) for r in select(records, impl="raw", **where)
    }
    ratios = [w / r for i in sorted(weft) if (w := weft[i]) and (r := raw.get(i))]
    if not ratios:
        return None, None
    return statistics.median(ratios), [min(ratios), max(ratios)]


#: The instruction rows: the HTTP load each stands beside, its name and its setting.
INSTRUCTION_ROWS = (
    ("throughput", "instructions per request", "1 conn, keep-alive (callgrind)"),
    ("churn", "instructions per conn", "1 conn, 1 req/conn (callgrind)"),
)


def _instruction_rows(records: list[dict[str, Any]], manager: str) -> list[Row]:
    """What a keep-alive request and a connection cost in instructions, weft beside raw.

    No target: these say where the clock's ratios come from, and unlike them they
    hardly move with the machine's load, so two runs of them should agree closely.
    """
    rows = []
    for load, metric, setting in INSTRUCTION_ROWS:
        where = {"suite": "instructions", "manager": manager, "load": load}
        weft, raw = (
            median(select(records, impl=impl, **where), "per_request") for impl in ("weft", "raw")
        )
        if weft is None and raw is None:
            continue
        ratio, spread = _paired_ratio(records, key="per_request", **where)
        rows.append(Row(manager, metric, setting, weft, raw, "instr", ratio, spread=spread))
    return rows


def _wrk_value(runs: list[dict[str, Any]], key: str) -> float | str | None:
    """The median, or "failed" if any run got no answer at all (see :func:`error_notes`)."""
    if any(r.get("requests", 0) == 0 for r in runs):
        return "failed"
    return median(runs, key)


def error_notes(records: list[dict[str, Any]]) -> list[str]:
    """wrk runs where more than 1 % of requests met an error or a non-2xx answer."""
    notes = []
    for r in records:
        errors = {k: v for k, v in (r.get("errors") or {}).items() if v}
        if errors and sum(errors.values()) > 0.01 * r.get("requests", 0):
            shown = ", ".join(f"{v:,} {k}" for k, v in errors.items())
            notes.append(
                f"{r['impl']} {r['manager']} {r['suite']} {r['setting']} run "
                f"{r['run'] + 1}: {r.get('requests', 0):,} requests, errors: {shown}"
            )
    return notes


def _idle_rows(records: list[dict[str, Any]], manager: str) -> list[Row]:
    rows = []
    settings = _settings(records, suite="idle", manager=manager)
    for setting in settings:
        runs = {
            impl: select(records, suite="idle", manager=manager, impl=impl, setting=setting)
            for impl in ("weft", "raw", "asyncio")
        }
        per = {impl: median(r, "kib_per_conn") for impl, r in runs.items()}
        ref = per["asyncio"] is not None
        weft, raw = (per["asyncio"], None) if ref else (per["weft"], per["raw"])
        label = f"{int(setting[2:]):,} conns" if setting != "n=max" else "most held"
        row = Row(
            manager,
            "idle RSS/conn",
            label,
            weft,
            raw,
            "KiB",
            weft / raw if weft is not None and raw else None,
        )
        if not ref and manager in THREAD_MANAGERS:
            n = int(setting[2:]) if setting != "n=max" else 0
            if n == THREADS_IDLE_TARGET:
                held = median(runs["weft"], "held")
                row.target = f"{THREADS_IDLE_TARGET:,} held (stack: see machine)"
                row.ok = held is not None and held >= THREADS_IDLE_TARGET
        elif not ref and manager in IDLE_RATIO_MANAGERS:
            row.target = f"≤1{TIMES} raw"
            row.ok = _compare(row.ratio, "<=", 1.0)
        elif not ref:
            row.target = f"≤{IDLE_TARGET_KIB:g} KiB"
            row.ok = _compare(weft, "<=", IDLE_TARGET_KIB)
        rows.append(row)
        if setting == "n=max":
            held_by = {impl: median(r, "held") for impl, r in runs.items()}
            nofile = max(r["nofile"] for rs in runs.values() for r in rs)
            weft_held, raw_held = (
                (held_by["asyncio"], None) if ref else (held_by["weft"], held_by["raw"])
            )
            rows.append(
                Row(
                    manager,
                    "most idle conns held",
                    f"fd limit {nofile:,}",
                    _count(weft_held),
                    _count(raw_held),
                    "",
                )
            )
    for impl in ("weft", "asyncio"):
        projection = _projection(records, manager, impl)
        if projection is not None:
            rows.append(
                Row(
                    manager,
                    f"RSS at {PROJECT_TO:,} (projected)",
                    f"from {projection[1]:,} conns",
                    projection[0],
                    None,
                    "MiB",
                )
            )
    for impl in ("weft", "asyncio"):
        echo = select(records, suite="idle-echo", manager=manager, impl=impl)
        if echo:
            worst = min(echo, key=lambda r: r["ok"] - r["failed"])
            rows.append(
                Row(
                    manager,
                    "echo after idle",
                    f"{worst['setting'][2:]} conns",
                    f"{worst['ok']:,} ok, {worst['failed']} failed",
                    None,
                    "",
                    ok=worst["failed"] == 0,
                )
            )
    return rows


def _projection(
    records: list[dict[str, Any]], manager: str, impl: str
) -> tuple[float, int] | None:
    """Baseline + slope between the two largest steps, extrapolated; (MiB, largest N)."""
    runs = select(records, suite="idle", manager=manager, impl=impl)
    by_n: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        if r["held"] == r["n"]:
            by_n.setdefault(r["n"], []).append(r)
    if len(by_n) < 2:
        return None
    n1, n2 = sorted(by_n)[-2:]
    rss1, rss2 = median(by_n[n1], "rss_kib"), median(by_n[n2], "rss_kib")
    assert rss1 is not None and rss2 is not None
    slope = (rss2 - rss1) / (n2 - n1)
    return (rss2 + slope * (PROJECT_TO - n2)) / 1024, n2


def _stop_rows(records: list[dict[str, Any]], manager: str) -> list[Row]:
    """weft's stop time beside the raw backend's stop by hand, and whether clients saw EOF.

    The target is absolute (issue 15); the raw time and the per-pair ratio say how much
    of it is the backend's own cost on this machine, with no target of their own.
    """
    rows = []
    for setting in _settings(records, suite="stop", manager=manager):
        runs = {
            impl: select(records, suite="stop", manager=manager, impl=impl, setting=setting)
            for impl in ("weft", "raw")
        }
        seconds = median(runs["weft"], "seconds")
        raw_seconds = median(runs["raw"], "seconds")
        ratio, spread = _paired_ratio(
            records, suite="stop", manager=manager, setting=setting, key="seconds"
        )
        bound = STOP_TARGET_S.get(manager, STOP_TARGET_DEFAULT_S)
        label = f"{int(setting[2:]):,} idle conns"
        rows.append(
            Row(
                manager,
                "stop() time",
                label,
                seconds,
                raw_seconds,
                "s",
                ratio,
                f"≤{bound:g} s",
                _compare(seconds, "<=", bound),
                spread,
            )
        )
        rows.append(
            Row(
                manager,
                "clients saw EOF",
                label,
                _eof(runs["weft"]),
                _eof(runs["raw"]),
                "",
                ok=all(r["eof"] == r["held"] and r["clean"] for rs in runs.values() for r in rs),
            )
        )
    return rows


def _eof(runs: list[dict[str, Any]]) -> str | None:
    """The fewest connections that saw EOF over the runs, of the fewest held; stops not clean."""
    if not runs:
        return None
    eof = min(r["eof"] for r in runs)
    held = min(r["held"] for r in runs)
    unclean = sum(not r["clean"] for r in runs)
    return f"{eof:,} of {held:,}" + (f", {unclean} stop(s) not clean" if unclean else "")


def _count(value: float | None) -> str | None:
    return None if value is None else f"{value:,.0f}"


def workers_summary(records: list[dict[str, Any]], managers: list[str]) -> list[dict[str, Any]]:
    """Per manager: the medians of each worker layout, and their ratios to ``--workers 1``.

    ``ratio`` is ``w2 / w1`` (two workers on cores 0 and 1, wrk sharing core 1) and
    ``ratio_same_core`` is ``w2same / w1``, in requests per second. ``per_core_ratio``
    compares requests per second per core the workers used (``w2`` over ``w1``):
    whether two workers turn CPU into requests as well as one does, which the
    contention for core 1 does not change.
    """
    out = []
    for manager in managers:
        runs = select(records, suite="workers", manager=manager)
        if not runs:
            continue
        entry: dict[str, Any] = {"manager": manager, "connections": WORKERS_CONNECTIONS}
        for name, count, cores, what in LAYOUTS:
            rs = select(runs, impl=name)
            if not rs:  # a layout this run did not measure (an older run's records)
                continue
            per_worker = [
                statistics.median(r["worker_cpu"][i] for r in rs) for i in range(count) if rs
            ]
            conns = [r["worker_conns"] for r in rs if r.get("worker_conns")]
            rps = median(rs, "rps")
            server_cpu = median(
                [{"cpu": sum(r["worker_cpu"])} for r in rs if r.get("worker_cpu")], "cpu"
            )
            rates = [{"v": v} for r in rs if (v := _rps_per_core(r)) is not None]
            entry[name] = {
                "layout": what,
                "workers": count,
                "cores": list(cores),
                "rps": rps,
                "p50_ms": median(rs, "p50_ms"),
                "p99_ms": median(rs, "p99_ms"),
                "worker_cpu": per_worker,
                "server_cpu": server_cpu,
                "rps_per_core": median(rates, "v"),
                "wrk_cpu": median(rs, "wrk_cpu"),
                "worker_conns": [statistics.median(c[i] for c in conns) for i in range(count)]
                if conns
                else None,
                "rps_runs": [r["rps"] for r in rs],
            }
        for name in ("w2", "w2rp", "w2same"):
            if name in entry:
                entry[name].update(_per_round(runs, name))
        if "w1" in entry:
            entry["w1"]["others"] = most_others(select(runs, impl="w1"))
        entry["ratio"] = _to_w1(entry, "w2", "rps")
        entry["ratio_same_core"] = _to_w1(entry, "w2same", "rps")
        entry["per_core_ratio"] = _to_w1(entry, "w2", "rps_per_core")
        entry["per_core_ratio_same_core"] = _to_w1(entry, "w2same", "rps_per_core")
        if "w2rp" in entry:
            entry["ratio_reuse_port"] = _to_w1(entry, "w2rp", "rps")
            entry["per_core_ratio_reuse_port"] = _to_w1(entry, "w2rp", "rps_per_core")
        out.append(entry)
    return out


# -- Markdown ------------------------------------------------------------------------------


def _fmt(value: float | str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit in ("req/s", "conn/s"):
        return f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "KiB":
        return f"{value:.1f} KiB"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def ratio_text(row: Row) -> str:
    """The median ratio (``1.023``, times sign), and its lowest-highest pair if they differ."""
    return "—" if row.ratio is None else _ranged(row.ratio, row.spread)


def _ranged(value: float, spread: list[float] | None) -> str:
    """``value`` as a ratio, and ``spread``'s lowest-highest if they differ."""
    text = f"{value:.3f}{TIMES}"
    if spread is not None:
        low, high = (f"{x:.2f}" for x in spread)
        text += f" ({low}-{high})" if low != high else ""
    return text


def table(rows: list[Row], raw_names: dict[str, str]) -> str:
    """weft beside its raw backend, one block of rows per manager."""
    lines = [
        "| manager (raw backend) | measure | setting | weft | raw | weft/raw | others' cores "
        "| target | met |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    previous = None
    for row in rows:
        name = "" if row.manager == previous else f"**{row.manager}** ({raw_names[row.manager]})"
        previous = row.manager
        ratio = ratio_text(row)
        met = {True: "yes", False: "**no**", None: ""}[row.ok]
        if row.ok is not None and busy_beside(row.others):
            met += BUSY_MARK
        lines.append(
            f"| {name} | {row.metric} | {row.setting} | {_fmt(row.weft, row.unit)} | "
            f"{_fmt(row.raw, row.unit)} | {ratio} | {others_text(row.others)} | {row.target} "
            f"| {met} |"
        )
    return "\n".join(lines)


def others_text(others: float | None) -> str:
    """Others' cores as the table shows them: two decimals, or a dash where not measured."""
    return "—" if others is None else f"{others:.2f}"


def busy_beside(others: float | None) -> bool:
    """Whether other processes used enough CPU during a figure's runs to doubt it."""
    return others is not None and others >= BUSY_CORES


#: What the table's "met" column adds to a figure measured beside others' load.
BUSY_MARK = " (others busy)"

#: The table's note on its "others' cores" column.
OTHERS_NOTE = (
    "**others' cores**: the most CPU, in cores, that processes other than the servers, "
    "wrk and the harness used during any of the figure's runs (the machine's busy time "
    'from `/proc/stat`, steal included, less theirs). A verdict marked "(others busy)" '
    "was measured while others used {busy:g} cores or more: rerun it on a quiet machine "
    "before trusting it."
)


def reference_table(rows: list[Row]) -> str:
    """The asyncio reference: absolute figures (kept in the ``weft`` field of its rows)."""
    lines = ["| measure | setting | asyncio.start_server |", "|---|---|---:|"]
    lines += [f"| {r.metric} | {r.setting} | {_fmt(r.weft, r.unit)} |" for r in rows]
    return "\n".join(lines)


#: Item 7 of issue 17: two workers turn a core's CPU into requests within 1.05x of
#: one worker's CPU per request (so at least 1/1.05 of its requests per core), and
#: spread the connections evenly (no worker holds more than this share of them).
WORKERS_PER_CORE_TARGET = 1 / 1.05
WORKERS_BUSIEST_TARGET = 0.60


def _rps_per_core(record: dict[str, Any]) -> float | None:
    """Requests per second per core the workers used, in one run (None without CPU)."""
    cpu = sum(record.get("worker_cpu") or [])
    return record["rps"] / cpu if cpu and record.get("rps") is not None else None


def _busiest(record: dict[str, Any]) -> float | None:
    conns = record.get("worker_conns") or []
    return max(conns) / sum(conns) if conns and sum(conns) > 0 else None


def _per_round(runs: list[dict[str, Any]], layout: str) -> dict[str, Any]:
    """A layout against ``w1`` round by round: the layouts of a round run back to back,
    so each round is a pair, as weft and raw are in the other suites.

    ``per_core_pairs`` is the median of the rounds' requests per core over ``w1``'s
    and [lowest, highest] of them; ``busiest`` the busiest worker's share of the
    connections, median and [lowest, highest]; ``others`` the most CPU (cores) other
    processes used during any of the layout's or ``w1``'s runs; ``met`` the two
    targets checked on the medians (None where not measured).
    """
    one = {r["run"]: _rps_per_core(r) for r in select(runs, impl="w1")}
    mine = select(runs, impl=layout)
    ratios = [v / w for r in mine if (v := _rps_per_core(r)) and (w := one.get(r["run"]))]
    shares = [b for r in mine if (b := _busiest(r)) is not None]
    out: dict[str, Any] = {
        "per_core_pairs": statistics.median(ratios) if ratios else None,
        "per_core_range": [min(ratios), max(ratios)] if ratios else None,
        "busiest": statistics.median(shares) if shares else None,
        "busiest_range": [min(shares), max(shares)] if shares else None,
        "others": most_others([*mine, *select(runs, impl="w1")]),
    }
    out["per_core_met"] = (
        None if out["per_core_pairs"] is None else out["per_core_pairs"] >= WORKERS_PER_CORE_TARGET
    )
    out["spread_met"] = (
        None if out["busiest"] is None else out["busiest"] <= WORKERS_BUSIEST_TARGET
    )
    return out


def _to_w1(entry: dict[str, Any], layout: str, key: str) -> float | None:
    if layout not in entry or "w1" not in entry:
        return None
    a, b = entry[layout][key], entry["w1"][key]
    return float(a / b) if a and b else None


def workers_table(entries: list[dict[str, Any]], seconds: float) -> str:
    """``weft serve --workers 2`` beside ``--workers 1``: one row per layout."""
    lines = [
        f"Workers: `weft serve HANDLER --manager M --workers N`, wrk keep-alive with "
        f"{WORKERS_CONNECTIONS} connections, {seconds:g} s per run, the layouts alternated. "
        "Cores used are CPU seconds per second of the run. This machine has 2 cores, so "
        "with 2 workers on cores 0 and 1 wrk shares core 1 with the second worker: the "
        "req/s ratio is bounded by what wrk leaves of core 1, while req/s per core used "
        "is not. Each round runs every layout once, back to back, so a round pairs a "
        f"layout with `--workers 1`: the per-core ratio is the median of the rounds' "
        f"ratios, lowest-highest in parentheses. Targets (issue 17, item 7): requests per "
        f"core at least {WORKERS_PER_CORE_TARGET:.3f}{TIMES} one worker's (CPU per request "
        f"within 1.05{TIMES}), and no worker holding more than "
        f"{WORKERS_BUSIEST_TARGET:.0%} of the connections. {OTHERS_NOTE.format(busy=BUSY_CORES)}",
        "",
        f"| manager | layout | req/s | {TIMES} 1 worker | p99 | cores used by each worker "
        f"| req/s per core used ({TIMES} 1 worker) | wrk's cores | conns per worker "
        "| busiest worker's share | others' cores | met (per core; spread) |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for entry in entries:
        name = f"**{entry['manager']}**"
        for layout, *_ in LAYOUTS:
            m = entry.get(layout)
            if m is None:  # a layout an older run did not have
                continue
            if layout == "w1":
                ratio, per_core = "1", ""
            elif layout == "w2":
                ratio = f"**{_times(entry['ratio'])}**"
                per_core = f" ({_times(entry['per_core_ratio'])})"
            elif layout == "w2rp":
                ratio = _times(entry["ratio_reuse_port"])
                per_core = f" ({_times(entry['per_core_ratio_reuse_port'])})"
            else:
                ratio = _times(entry["ratio_same_core"])
                per_core = f" ({_times(entry['per_core_ratio_same_core'])})"
            if m.get("per_core_pairs") is not None:  # rounds paired (since 2026-12-07)
                per_core = f" ({_ranged(m['per_core_pairs'], m['per_core_range'])})"
            cpu = " + ".join(f"{c:.2f}" for c in m["worker_cpu"]) or "—"
            wrk_cpu = "—" if m["wrk_cpu"] is None else f"{m['wrk_cpu']:.2f}"
            conns = " + ".join(f"{c:.0f}" for c in m["worker_conns"] or []) or "—"
            busiest = (
                "—"
                if m.get("busiest") is None
                else f"{m['busiest']:.0%}" + _share_range(m["busiest_range"])
            )
            lines.append(
                f"| {name} | {m['layout']} | {_fmt(m['rps'], 'req/s')} | {ratio} | "
                f"{_fmt(m['p99_ms'], 'ms')} | {cpu} | {_fmt(m['rps_per_core'], 'req/s')}"
                f"{per_core} | {wrk_cpu} | {conns} | {busiest} | {others_text(m.get('others'))} "
                f"| {_workers_met(m)} |"
            )
            name = ""
    return "\n".join(lines)


def _share_range(spread: list[float]) -> str:
    low, high = (f"{x:.0%}" for x in spread)
    return f" ({low}-{high})" if low != high else ""


def _workers_met(layout: dict[str, Any]) -> str:
    """A layout's verdicts on the two targets; empty for ``w1`` and older records."""
    verdicts = [layout.get("per_core_met"), layout.get("spread_met")]
    if verdicts == [None, None]:
        return ""
    text = "; ".join({True: "yes", False: "**no**", None: "—"}[v] for v in verdicts)
    return text + (BUSY_MARK if busy_beside(layout.get("others")) else "")


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def markdown(result: dict[str, Any], plot_name: str | None) -> str:
    opts = result["options"]
    info = result["machine"]
    raw_names = {m: RAW_BACKENDS[f] for m, f in result["raw_flavours"].items()}
    # The asyncio reference row's records are filed under "asyncio"; a run that
    # measures the asyncio manager has no reference (its raw backend is the same).
    reference_name = "asyncio" if opts.get("reference") else None
    rows = [Row(**r) for r in result["summary"]]
    kind = "quick smoke run (short, 1 run each: indicative only)" if opts["quick"] else "full run"
    parts = [
        f"# weft benchmarks: {kind}",
        "",
        f"{result['started']}, {result['elapsed_s']:.0f} s. Medians of {opts['runs']} run(s) per "
        f"figure (idle memory: {min(opts['runs'], IDLE_RUNS)}), weft and raw alternated; for wrk and stop figures weft/raw is the median "
        f"of the ratios within each weft-then-raw pair, lowest-highest of them in parentheses. "
        f"The stop target is absolute; the raw stop (the backend's graceful stop by hand, "
        f"the same work) shows what of it is the backend's own cost. wrk {opts['seconds']:g} s per run, "
        f"1 thread. Server on core 0, wrk and clients on core 1.",
        "",
        f"Machine: {describe(result['machine'])}.",
        "",
        table([r for r in rows if r.manager != reference_name], raw_names),
        "",
        OTHERS_NOTE.format(busy=BUSY_CORES),
    ]
    if result.get("workers"):
        parts += ["", workers_table(result["workers"], opts["seconds"])]
    reference = [r for r in rows if r.manager == reference_name]
    if reference:
        parts += [
            "",
            "Reference, no weft: asyncio (`asyncio.start_server`, same handler logic, same load).",
            "",
            reference_table(reference),
        ]
    busy = max(info.get("busy_start") or 0.0, info.get("busy_end") or 0.0)
    if busy >= BUSY_FRACTION:
        parts += [
            "",
            f"**The machine was busy:** with no benchmark process running, "
            f"{busy:.0%} of its CPU time went to other processes (sampled for "
            f"{BUSY_SAMPLE:g} s before and after the run). They share the server's core, so "
            "these figures are noisy; rerun on an idle machine before drawing conclusions."
            + (
                " The instruction counts excepted: callgrind counts what the server "
                "executes, whatever else runs."
                if any(r.unit == "instr" for r in rows)
                else ""
            ),
        ]
    notes = error_notes(result["records"])
    if notes:
        parts += ["", "wrk errors (more than 1 % of requests; see the servers' log):", ""]
        parts += [f"- {note}" for note in notes]
    if result.get("skipped"):
        parts += ["", "Not measured: " + "; ".join(result["skipped"]) + "."]
    if plot_name:
        parts += ["", f"![weft/raw ratios, idle memory and stop time]({plot_name})"]
    return "\n".join(parts) + "\n"


# -- plot ----------------------------------------------------------------------------------


def _ratio_panels(rows: list[Row]) -> list[tuple[str, Row]]:
    """The ratios worth a bar: throughput, p99 at 100, churn, idle RSS at the largest full step."""
    picked = []
    idle = [r for r in rows if r.metric == "idle RSS/conn" and r.ratio is not None]
    largest = {}
    for r in idle:
        if r.setting != "most held":
            largest[r.manager] = r
    for r in rows:
        if r.ratio is None:
            continue
        if r.metric == "keep-alive req/s":
            picked.append((f"req/s\n{r.setting}", r))
        elif r.metric == "p99 latency" and r.setting == "100 conns":
            picked.append(("p99\n100 conns", r))
        elif r.metric == "churn conn/s":
            picked.append(("churn\nconn/s", r))
        elif largest.get(r.manager) is r:
            picked.append(("idle RSS\nper conn", r))
    return picked


def plot(result: dict[str, Any], path: Path) -> bool:
    """The same figures as the table, as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [Row(**r) for r in result["summary"]]
    managers = list(result["options"]["managers"])
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys([*managers, "asyncio"]))}
    workers = result.get("workers") or []
    # The ratios across the top; idle memory, stop time and workers below.
    fig = plt.figure(figsize=(16, 10.5))
    below = 3 if workers else 2
    grid = fig.add_gridspec(2, below, width_ratios=[1.5, 1, 1.1][:below])
    axes = [fig.add_subplot(grid[0, :])] + [fig.add_subplot(grid[1, i]) for i in range(below)]

    ax = axes[0]
    picked = _ratio_panels(rows)
    labels = list(dict.fromkeys(label for label, _ in picked))
    width = 0.8 / max(1, len(managers))
    for i, manager in enumerate(managers):
        values = {
            label: r.ratio for label, r in picked if r.manager == manager and r.ratio is not None
        }
        xs = [j + i * width for j, label in enumerate(labels) if label in values]
        ys = [values[label] for label in labels if label in values]
        heights = [min(max(y, RATIO_LIMITS[0]), RATIO_LIMITS[1]) - 1 for y in ys]
        ax.bar(xs, heights, width, bottom=1, label=manager, color=colours[manager])
    for j, label in enumerate(labels):
        target = next((r.target for lab, r in picked if lab == label and r.target), "")
        if TIMES in target:
            bound = float(target[1:].split(TIMES)[0])
            ax.hlines(bound, j - 0.1, j + 0.9 - 0.1, color="red", linestyle=":", linewidth=1.2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(*RATIO_LIMITS)
    ax.set_yticks(RATIO_TICKS, [f"{t:g}" for t in RATIO_TICKS])
    ax.minorticks_off()
    ax.set_xticks([j + width * (len(managers) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"weft / raw (log scale, clipped to {RATIO_LIMITS[0]:g}-{RATIO_LIMITS[1]:g})")
    ax.set_title("weft / raw: req/s higher is better; p99, RSS lower (red: target)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1]
    for manager in dict.fromkeys([*managers, "asyncio"]):
        for impl, style in (("weft", "-o"), ("raw", "--x"), ("asyncio", ":s")):
            points = [
                (r["held"], r["kib_per_conn"])
                for r in result["records"]
                if r["suite"] == "idle"
                and r["manager"] == manager
                and r["impl"] == impl
                and r.get("kib_per_conn") is not None
            ]
            if points:
                ns = sorted({n for n, _ in points})
                meds = [statistics.median(v for n2, v in points if n2 == n) for n in ns]
                name = "asyncio" if impl == "asyncio" else f"{manager} {impl}"
                ax.plot(ns, meds, style, label=name, color=colours[manager])
    ax.axhline(IDLE_TARGET_KIB, color="red", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("idle connections held by one server")
    ax.set_ylabel("server RSS over baseline, KiB per connection")
    ax.set_title("idle memory (solid: weft, dashed: raw)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)

    ax = axes[2]
    stops = [(r, r.weft) for r in rows if r.metric == "stop() time" and isinstance(r.weft, float)]
    for i, (r, seconds) in enumerate(stops):
        colour = colours.get(r.manager, "C0")
        ax.bar(i - 0.2, seconds, 0.4, color=colour)
        if isinstance(r.raw, float):
            ax.bar(i + 0.2, r.raw, 0.4, color=colour, alpha=0.4, hatch="//")
        bound = STOP_TARGET_S.get(r.manager, STOP_TARGET_DEFAULT_S)
        ax.hlines(bound, i - 0.4, i + 0.4, color="red", linestyle=":")
    ax.set_xticks(range(len(stops)))
    ax.set_xticklabels([f"{r.manager}\n{r.setting}" for r, _ in stops], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("stop with idle connections (solid: weft, hatched: raw)", fontsize=10)

    if workers:
        _workers_panel(axes[3], workers, colours)

    info = result["machine"]
    fig.suptitle(
        f"weft benchmarks, {'quick' if result['options']['quick'] else 'full'} run: "
        f"{info['cpu']}, {info['cores']} cores, {info['python']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _workers_panel(ax: Any, workers: list[dict[str, Any]], colours: dict[str, str]) -> None:
    """``--workers 2`` / ``--workers 1`` per manager: req/s, and req/s per core used."""
    groups = [
        ("ratio", "req/s\ncores 0+1\n(wrk shares 1)"),
        ("per_core_ratio", "req/s per core\ncores 0+1"),
        ("ratio_same_core", "req/s\nboth on core 0"),
    ]
    width = 0.8 / max(1, len(workers))
    for i, entry in enumerate(workers):
        xs = [j + i * width for j in range(len(groups))]
        ys = [entry[key] or 0 for key, _ in groups]
        ax.bar(xs, ys, width, label=entry["manager"], color=colours.get(entry["manager"], "C0"))
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="grey", linewidth=0.6, linestyle="--")
    ax.set_ylim(0, 2.2)
    ax.set_xticks([j + width * (len(workers) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([label for _, label in groups], fontsize=8)
    ax.set_ylabel(f"2 workers / 1 worker ({WORKERS_CONNECTIONS} conns, keep-alive)")
    ax.set_title("weft serve --workers 2 / --workers 1", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def write(result: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    has_plot = plot(result, paths["png"])
    if not has_plot:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        del paths["png"]
    paths["md"].write_text(markdown(result, paths["png"].name if has_plot else None))
    return paths
