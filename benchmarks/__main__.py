"""``python -m benchmarks run``: every manager beside its raw backend; see docs/performance.md.

Also ``python -m benchmarks longpoll``: parked subscribers' memory and broadcast
time (benchmarks/longpoll.py); ``python -m benchmarks profile --manager NAME``: the
weft server under py-spy while wrk loads it, with the hottest functions of weft's own code; and
``python -m benchmarks instructions --manager NAME``: instructions per request of
weft and of the raw backend under callgrind, a figure the machine's noise leaves alone;
``python -m benchmarks compare EARLIER.json LATER.json``: which figures of two runs
repeat, and which to flag.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import TypedDict

from . import compare, instructions, longpoll, report, wrk
from .procs import CLIENT_CORE, ROOT, pin, raise_nofile
from .server import VARIANTS, raw_flavour
from .suites import MAX, SUITES, Options, progress, run_all

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs" / "performance.md"
DOCS_START = "<!-- results:start -->"
DOCS_END = "<!-- results:end -->"


class Preset(TypedDict):
    """How much a run measures: ``--quick`` or the full run."""

    runs: int
    seconds: float
    warmup: float
    idle_steps: str
    stop_connections: int


FULL: Preset = {
    # Five weft-then-raw pairs of 6 s rather than three of 10 s: as long, and the
    # median of five paired ratios shrugs off one disturbed pair.
    "runs": 5,
    "seconds": 6.0,
    "warmup": 2.0,
    "idle_steps": "2000,5000,10000,19000,max",
    "stop_connections": 10_000,
}
QUICK: Preset = {
    "runs": 1,
    "seconds": 2.0,
    "warmup": 1.0,
    "idle_steps": "1000,2000",
    "stop_connections": 2_000,
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace("_", "").split(",") if x]


def _steps(text: str) -> list[int]:
    """Idle steps: counts, or ``max`` (as many as the server's fd limit allows)."""
    return [MAX if x.strip() == "max" else int(x) for x in text.replace("_", "").split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure and write benchmarks/results/")
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (~8 min, ~3 without valgrind): 1 run, 2 s per wrk run, small idle counts",
    )
    run.add_argument(
        "--managers", type=_names, help="comma-separated (default: every installed one)"
    )
    run.add_argument(
        "--only",
        type=_names,
        default=list(SUITES),
        help=f"comma-separated subset of {','.join(SUITES)}",
    )
    run.add_argument(
        "--runs", type=int, help="runs per figure (full: 5, quick: 1; idle memory: at most 3)"
    )
    run.add_argument("--seconds", type=float, help="seconds per wrk run (full: 6, quick: 2)")
    run.add_argument(
        "--connections",
        type=_ints,
        default=[10, 100, 1000],
        help="keep-alive connection counts (default 10,100,1000)",
    )
    run.add_argument(
        "--churn-connections",
        type=_ints,
        default=[50],
        help="concurrent wrk connection counts in the churn test (default 50)",
    )
    run.add_argument(
        "--idle-steps",
        type=_steps,
        help="idle connection counts on one server, 'max' for as many as its fd "
        "limit allows (full: 2000,5000,10000,19000,max; quick: 1000,2000)",
    )
    run.add_argument(
        "--idle-threads-max",
        type=int,
        default=10_000,
        help="largest idle step for thread-per-connection servers (default 10000)",
    )
    run.add_argument(
        "--stop-connections",
        type=int,
        help="idle connections during the timed stop (full: 10000, quick: 2000)",
    )
    run.add_argument(
        "--per-client",
        type=int,
        default=10_000,
        help="connections per idle-client process, each on its own 127.0.0.x",
    )
    run.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the asyncio reference row",
    )
    run.add_argument(
        "--out",
        type=Path,
        help="where to write (default benchmarks/results/; "
        "a quick run goes to benchmarks/results/raw/)",
    )
    run.add_argument(
        "--docs", action="store_true", help="also put the table and plot into docs/performance.md"
    )

    prof = sub.add_parser("profile", help="py-spy the weft server under wrk load")
    prof.add_argument("--manager", default="threads")
    prof.add_argument("--connections", type=int, default=100)
    prof.add_argument("--churn", action="store_true", help="one request per connection")
    prof.add_argument("--seconds", type=float, default=10.0)
    prof.add_argument("--top", type=int, default=25)
    instructions.add_parser(sub)
    compare.add_parser(sub)
    longpoll.add_parser(sub)
    return top


def command_run(args: argparse.Namespace) -> int:
    import weft_core

    preset = QUICK if args.quick else FULL
    specs = dict(weft_core.available_managers())
    # A variant is there when its manager is; asked for by name only, but for
    # asyncio-uvloop, which issue 15 asks for in every table, where uvloop is installed.
    specs.update({v: specs[base] for v, (base, _) in VARIANTS.items() if base in specs})
    managers = args.managers or [
        m
        for m in specs
        if m not in VARIANTS
        or (m == "asyncio-uvloop" and importlib.util.find_spec("uvloop") is not None)
    ]
    missing = [m for m in managers if m not in specs]
    skipped: list[str] = []
    for m in missing:
        skipped.append(f"manager {m} (not installed; installed: {', '.join(specs) or 'none'})")
        print(
            f"skipping manager {m!r}: not installed (installed: {', '.join(specs)})",
            file=sys.stderr,
        )
    managers = [m for m in managers if m in specs]
    if not managers:
        print(
            f"no manager to measure: {', '.join(missing)} not installed (installed:"
            f" {', '.join(specs) or 'none'})",
            file=sys.stderr,
        )
        return 2
    only = set(args.only)
    unknown = only - set(SUITES)
    if unknown:
        print(
            f"unknown --only {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}",
            file=sys.stderr,
        )
        return 2
    for manager in list(managers):
        flavour = raw_flavour(manager, specs[manager].handler_kind)
        module = {
            "gevent": "gevent",
            "gevent-patched": "gevent",
            "trio": "trio",
            "asyncio-uvloop": "uvloop",
        }.get(flavour)
        if module and importlib.util.find_spec(module) is None:
            skipped.append(f"{manager} (its raw backend needs {module})")
            managers.remove(manager)
    wrk_path = wrk.find()
    if only & {"throughput", "churn", "instructions", "workers"} and wrk_path is None:
        print(wrk.MISSING, file=sys.stderr)
        return 2
    if "instructions" in only and not instructions.available():
        skipped.append(f"instructions ({instructions.MISSING})")
        print(f"skipping instructions: {instructions.MISSING}", file=sys.stderr)
        only.discard("instructions")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or (RESULTS / "raw" if args.quick else RESULTS)
    # The logs and the time-stamped copy go beside an --out, never into the repository.
    raw_dir = out / "raw" if args.out else RESULTS / "raw"
    logdir = raw_dir / f"logs-{stamp}"
    opts = Options(
        managers=managers,
        only=only,
        runs=args.runs or preset["runs"],
        seconds=args.seconds or preset["seconds"],
        warmup=preset["warmup"],
        connections=args.connections,
        churn_connections=args.churn_connections,
        idle_steps=args.idle_steps or _steps(preset["idle_steps"]),
        idle_threads_max=args.idle_threads_max,
        stop_connections=args.stop_connections or preset["stop_connections"],
        per_client=args.per_client,
        # The asyncio manager's own raw backend is the reference's asyncio.start_server.
        reference=args.reference and "asyncio" not in managers,
        quick=args.quick,
        logdir=logdir,
        wrk=wrk_path,
    )
    pin(CLIENT_CORE)
    raise_nofile()
    info = report.machine(wrk.version(wrk_path) if wrk_path else None)
    started = time.monotonic()
    progress(
        f"weft benchmarks: {', '.join(managers)}; {', '.join(s for s in SUITES if s in only)}; "
        f"logs in {logdir}"
    )
    records = run_all(opts, specs).records
    info["loadavg_end"] = report.loadavg()
    info["busy_end"] = report.cpu_busy()
    summary_managers = managers + (["asyncio"] if opts.reference else [])
    result = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "elapsed_s": time.monotonic() - started,
        "machine": info,
        "options": {
            **{k: v for k, v in vars(opts).items() if k not in ("logdir", "wrk", "only")},
            "only": sorted(only),
        },
        "raw_flavours": {m: raw_flavour(m, specs[m].handler_kind) for m in managers},
        "skipped": skipped,
        "records": records,
        "summary": [vars(r) for r in report.summarise(records, summary_managers)],
        "workers": report.workers_summary(records, managers),
    }
    stem = "quick" if args.quick else "latest"
    paths = report.write(result, out, stem)
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{stamp}.json").write_text(paths["json"].read_text())
    if args.docs:
        update_docs(paths["md"], DOCS)
    print(paths["md"].read_text())
    print("written: " + ", ".join(_shown(p) for p in paths.values()), file=sys.stderr)
    return 0


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (``--out`` may be anywhere)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def update_docs(table_md: Path, docs: Path) -> None:
    """Replace what lies between the results markers of docs/performance.md."""
    text = docs.read_text()
    title, body = table_md.read_text().split("\n", 1)
    body = f"*{title.removeprefix('# ').capitalize()}.*\n\n{body.strip()}"
    rel = Path("..") / table_md.resolve().relative_to(ROOT).parent
    body = re.sub(r"!\[(.*?)\]\((\S+?\.png)\)", lambda m: f"![{m[1]}]({rel / m[2]})", body)
    start, end = text.index(DOCS_START), text.index(DOCS_END)
    docs.write_text(text[: start + len(DOCS_START)] + "\n\n" + body + "\n\n" + text[end:])


def command_profile(args: argparse.Namespace) -> int:
    from .profile import profile

    return profile(args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        return command_run(args)
    if args.command == "compare":
        return compare.command_compare(args)
    if args.command == "instructions":
        return instructions.command_instructions(args)
    if args.command == "longpoll":
        return longpoll.orchestrate(args)
    return command_profile(args)


if __name__ == "__main__":
    sys.exit(main())
