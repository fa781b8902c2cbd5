"""``python -m benchmarks compare``: a figure that moves more than its spread is flagged.

Issue 17 asks that a figure moving between two full runs by more than its spread is
flagged, never published as met. These results are made up (records as the
benchmark writes them), so each case is exact: the rule, not the machine, is tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import compare  # noqa: E402


def _result(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """A run of keep-alive at 10 connections on gevent: (weft, raw) req/s per pair."""
    records = []
    for run, (weft, raw) in enumerate(pairs):
        for impl, rps in (("weft", weft), ("raw", raw)):
            records.append(
                {
                    "suite": "throughput",
                    "manager": "gevent",
                    "impl": impl,
                    "setting": "c=10",
                    "run": run,
                    "rps": rps,
                    "requests": int(rps * 6),
                }
            )
    return {"records": records, "options": {"managers": ["gevent"]}}


def _keep_alive(earlier: dict[str, Any], later: dict[str, Any]) -> Any:
    [verdict] = [v for v in compare(earlier, later) if v.later.metric == "keep-alive req/s"]
    return verdict


def test_a_figure_within_each_others_range_repeats_and_counts_as_met() -> None:
    earlier = _result([(98, 100), (103, 100), (100, 100)])  # 0.98-1.03, median 1.00
    later = _result([(99, 100), (102, 100), (101, 100)])  # 0.99-1.02, median 1.01
    verdict = _keep_alive(earlier, later)
    assert verdict.repeats is True
    assert verdict.verdict == "met"


def test_a_figure_that_moves_past_the_earlier_range_is_flagged_though_both_runs_met() -> None:
    earlier = _result([(96, 100), (97, 100), (98, 100)])  # 0.96-0.98: met (>= 0.95)
    later = _result([(104, 100), (105, 100), (106, 100)])  # 1.04-1.06: met, but moved
    verdict = _keep_alive(earlier, later)
    assert verdict.repeats is False
    assert verdict.verdict == "does not repeat"


def test_met_in_one_run_and_missed_in_the_other_is_at_the_bound() -> None:
    earlier = _result([(93, 100), (96, 100), (94, 100)])  # median 0.94: missed
    later = _result([(95, 100), (94, 100), (96, 100)])  # median 0.95: met
    verdict = _keep_alive(earlier, later)
    assert verdict.repeats is True
    assert verdict.verdict == "at the bound"


def test_one_pair_has_no_range_to_judge_by() -> None:
    verdict = _keep_alive(_result([(100, 100)]), _result([(120, 100)]))
    assert verdict.repeats is None
    assert verdict.verdict == "met"


@pytest.mark.timeout(60)
def test_the_command_prints_the_table_and_refuses_an_unreadable_file(tmp_path: Path) -> None:
    earlier, later = tmp_path / "earlier.json", tmp_path / "later.json"
    earlier.write_text(json.dumps(_result([(96, 100), (97, 100), (98, 100)])))
    later.write_text(json.dumps(_result([(104, 100), (105, 100), (106, 100)])))
    command = [sys.executable, "-m", "benchmarks", "compare"]
    done = subprocess.run(
        [*command, str(earlier), str(later)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "| gevent | keep-alive req/s | 10 conns |" in done.stdout
    assert "**does not repeat**" in done.stdout
    missing = subprocess.run(
        [*command, str(earlier), str(tmp_path / "nope.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"cannot read {tmp_path / 'nope.json'}")
    assert missing.stderr.count("\n") == 1
