"""``python -m benchmarks compare EARLIER.json LATER.json``: does each figure repeat?

One run's weft/raw ratio is the median of its weft-then-raw pairs, and the lowest and
highest pair say how far the machine moved it within the run. A figure *repeats* when
each run's median lies within the other run's range of pairs: the second run found
what the first did, within the noise the first one showed. A figure that moves more
than that between two runs is flagged, never counted as met, whatever either run
said on its own (issue 17: "a figure that moves more than its spread between two full
runs is flagged, not published as met").

Both files are the JSON that ``python -m benchmarks run`` writes; their rows are made
again from the raw records, so files written before the report kept ranges compare too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import Row, busy_beside, ratio_text, summarise

__all__ = ["Verdict", "add_parser", "command_compare", "compare", "markdown"]


@dataclass
class Verdict:
    """One figure in both runs (its name is the rows'), and what the pair says of it."""

    earlier: Row
    later: Row
    #: True: each median within the other's range; False: it moved more; None: no range.
    repeats: bool | None
    #: "met", "met, repeat not shown (no range)", "met beside others' load: rerun on a
    #: quiet machine", "missed", "at the bound" (met in one run only), "does not
    #: repeat", "no target".
    verdict: str


def repeats(earlier: Row, later: Row) -> bool | None:
    """True if each run's ratio lies within the other's range of pairs; None if unknowable.

    A figure with no pairs (idle memory, a count) or a run of one pair has no range to
    judge by.
    """
    ranges = (earlier.spread, later.spread)
    if (
        earlier.ratio is None
        or later.ratio is None
        or any(r is None or r[0] == r[1] for r in ranges)
    ):
        return None
    assert earlier.spread is not None and later.spread is not None
    return (
        earlier.spread[0] <= later.ratio <= earlier.spread[1]
        and later.spread[0] <= earlier.ratio <= later.spread[1]
    )


def _verdict(earlier: Row, later: Row, repeat: bool | None) -> str:
    if not later.target and not earlier.target:
        return "no target"
    if repeat is False:
        return "does not repeat"
    if earlier.ok and later.ok:
        if busy_beside(earlier.others) or busy_beside(later.others):
            # Met twice, but with others' load on the machine during a run: what
            # repeated may be that load as much as weft.
            return "met beside others' load: rerun on a quiet machine"
        # One pair (a --quick run), or a figure with no pairs (idle memory): nothing
        # shows it repeats, so it is not "met" without saying so.
        return "met, repeat not shown (no range)" if repeat is None else "met"
    if earlier.ok is False and later.ok is False:
        return "missed"
    return "at the bound"


def compare(earlier: dict[str, Any], later: dict[str, Any]) -> list[Verdict]:
    """Every figure both results have, in the later run's order."""

    def rows(result: dict[str, Any]) -> dict[tuple[str, str, str], Row]:
        made = summarise(result["records"], result["options"]["managers"])
        return {(r.manager, r.metric, r.setting): r for r in made}

    before = rows(earlier)
    verdicts = []
    for key, row in rows(later).items():
        old = before.get(key)
        if old is None:
            continue
        repeat = repeats(old, row)
        verdicts.append(Verdict(old, row, repeat, _verdict(old, row, repeat)))
    return verdicts


def _ratio(row: Row) -> str:
    return ratio_text(row) + {True: ", met", False: ", missed", None: ""}[row.ok]


def markdown(verdicts: list[Verdict], earlier: str, later: str) -> str:
    """The table: each figure's ratio and range in both runs, and the verdict."""
    lines = [
        f"# Does each figure repeat? {earlier} against {later}",
        "",
        "A figure repeats when each run's weft/raw median lies within the other run's "
        "lowest-highest pair; one that does not is flagged, whatever either run says.",
        "",
        f"| manager | measure | setting | target | {earlier} | {later} | repeats | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        repeat = {True: "yes", False: "**no**", None: "—"}[v.repeats]
        verdict = f"**{v.verdict}**" if v.verdict == "does not repeat" else v.verdict
        lines.append(
            f"| {v.later.manager} | {v.later.metric} | {v.later.setting} | "
            f"{v.later.target or v.earlier.target} | "
            f"{_ratio(v.earlier)} | {_ratio(v.later)} | {repeat} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("compare", help="which figures of two runs repeat, which to flag")
    cmd.add_argument("earlier", type=Path, help="a run's JSON (benchmarks/results/...)")
    cmd.add_argument("later", type=Path, help="a later run's JSON")
    cmd.add_argument("--out", type=Path, help="write the table here too")


def command_compare(args: argparse.Namespace) -> int:
    results = []
    for path in (args.earlier, args.later):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            return 2
    text = markdown(compare(*results), args.earlier.stem, args.later.stem)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0
