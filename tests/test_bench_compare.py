"""``trionats bench`` repetitions, spread and ``--compare``: pure functions on hand-written
reports (no server, no timing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trionats._bench import (
    MIN_BAND,
    REPORT_VERSION,
    BenchConfig,
    BenchError,
    Change,
    check_comparable,
    check_report,
    compare_reports,
    figure_better,
    has_uvloop_side,
    load_report,
    scenario_stats,
    spread,
    summarize,
)


def _runs(**figures: list[float]) -> list[dict[str, Any]]:
    """Repetitions from per-figure value lists: _runs(rate=[1, 2]) -> [{rate: 1}, {rate: 2}]."""
    lengths = {len(values) for values in figures.values()}
    assert len(lengths) == 1
    return [{name: values[i] for name, values in figures.items()} for i in range(lengths.pop())]


def _report(results: dict[str, dict[str, list[dict[str, Any]]]], **extra: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "format": "trionats-bench",
        "format_version": REPORT_VERSION,
        "date": "2026-11-25T12:00:00+00:00",
        "machine": {"cpu_count": 2},
        "config": {"count": 1000, "size": 128, "concurrency": 100, "reps": 5},
        "counts": {scenario: 1000 for scenario in results},
        "results": results,
    }
    report.update(extra)
    return report


def _one(changes: list[Change], what: str, figure: str, scenario: str = "publish") -> Change:
    [change] = [c for c in changes if (c.scenario, c.what, c.figure) == (scenario, what, figure)]
    return change


STEADY = {
    "publish": {
        "trionats": _runs(rate=[100.0, 101.0, 99.0, 100.0, 100.5]),
        "raw": _runs(rate=[100.0, 100.0, 99.5, 100.5, 100.0]),
    }
}


def test_spread_is_median_min_max_and_mad() -> None:
    assert spread([3.0, 1.0, 2.0, 10.0, 2.5]) == {
        "n": 5,
        "median": 2.5,
        "min": 1.0,
        "max": 10.0,
        "mad": 0.5,  # |deviations| 0.5 1.5 0.5 7.5 0 -> median 0.5: the outlier does not count
    }
    assert spread([7.0]) == {"n": 1, "median": 7.0, "min": 7.0, "max": 7.0, "mad": 0.0}


def test_the_ratio_is_the_median_of_per_repetition_ratios() -> None:
    sides = {
        "trionats": _runs(rate=[100.0, 200.0, 90.0]),
        "raw": _runs(rate=[100.0, 100.0, 100.0]),
        "raw_uvloop": _runs(rate=[50.0, 100.0, 100.0]),
    }
    stats = scenario_stats(sides)
    assert stats["ratios"]["ratio"] == spread([1.0, 2.0, 0.9])
    assert stats["ratios"]["ratio_uvloop"] == spread([2.0, 2.0, 0.9])
    row = summarize({"publish": sides})["publish"]
    assert row["ratio"] == 1.0
    assert (row["ratio_min"], row["ratio_max"]) == (0.9, 2.0)
    assert row["ratio_uvloop"] == 2.0
    assert row["trionats_rate"] == 100.0
    assert (row["trionats_rate_min"], row["trionats_rate_max"]) == (90.0, 200.0)
    assert row["trionats_rate_mad"] == 10.0
    assert row["raw_uvloop_rate"] == 100.0


def test_summarize_skips_what_is_not_a_number_and_missing_sides() -> None:
    sides: dict[str, list[dict[str, Any]]] = {
        "trionats": [{"rate": 5.0, "note": "x", "ok": True}, {"rate": 7.0, "note": "y"}],
        "raw": [{"rate": 6.0}, {"rate": 6.0}],
        "raw_uvloop": [],
    }
    row = summarize({"s": sides})["s"]
    assert "trionats_note" not in row
    assert "trionats_ok" not in row
    assert "ratio_uvloop" not in row
    assert "raw_uvloop_rate" not in row
    assert row["ratio"] == pytest.approx(1.0)


def test_figure_direction() -> None:
    assert figure_better("rate") == "higher"
    assert figure_better("reuse_rate") == "higher"
    assert figure_better("ratio_uvloop") == "higher"
    for figure in ("p50_ms", "p99_ms", "borrow_p99_ms", "mean_ms", "dropped"):
        assert figure_better(figure) == "lower", figure


def test_uvloop_side_where_the_event_loop_is_what_is_measured() -> None:
    assert has_uvloop_side("request")
    assert has_uvloop_side("publish")
    assert not has_uvloop_side("subscriber_1ms")
    assert not has_uvloop_side("js_publish")


def test_the_same_report_twice_is_all_noise() -> None:
    report = _report(STEADY)
    changes = compare_reports(report, report)
    assert [(c.what, c.figure) for c in changes] == [
        ("trionats", "rate"),
        ("raw", "rate"),
        ("ratio", "ratio"),
    ]
    assert all(c.verdict == "noise" and c.change_pct == 0 for c in changes)
    assert not any(c.regression for c in changes)


def test_a_drop_beyond_the_band_is_a_regression() -> None:
    new = {
        "publish": {
            "trionats": _runs(rate=[70.0, 71.0, 69.0, 70.0, 70.5]),
            "raw": STEADY["publish"]["raw"],
        }
    }
    changes = compare_reports(_report(STEADY), _report(new))
    ours = _one(changes, "trionats", "rate")
    assert ours.old == 100.0
    assert ours.new == 70.0
    assert ours.change_pct == pytest.approx(-30.0)
    # half-ranges 1.0 and 1.0: 2.0 of 100, at the 2% floor
    assert ours.band_pct == pytest.approx(2.0)
    assert ours.verdict == "worse"
    assert ours.regression
    ratio = _one(changes, "ratio", "ratio")
    assert ratio.regression
    raw = _one(changes, "raw", "rate")
    assert raw.verdict == "noise"


def test_the_band_is_the_sum_of_both_half_ranges() -> None:
    old = {"publish": {"trionats": _runs(rate=[80.0, 100.0, 120.0])}}  # half-range 20
    new = {"publish": {"trionats": _runs(rate=[75.0, 85.0, 95.0])}}  # half-range 10
    change = _one(compare_reports(_report(old), _report(new)), "trionats", "rate")
    assert change.band_pct == pytest.approx(30.0)
    assert change.change_pct == pytest.approx(-15.0)
    assert change.verdict == "noise"  # -15% is within a 30% band
    worse = {"publish": {"trionats": _runs(rate=[60.0, 65.0, 70.0])}}  # half-range 5
    change = _one(compare_reports(_report(old), _report(worse)), "trionats", "rate")
    assert change.band_pct == pytest.approx(25.0)
    assert change.change_pct == pytest.approx(-35.0)
    assert change.regression


def test_the_floor_keeps_tiny_changes_noise() -> None:
    old = {"publish": {"trionats": _runs(rate=[100.0, 100.0])}}
    new = {"publish": {"trionats": _runs(rate=[101.5, 101.5])}}
    change = _one(compare_reports(_report(old), _report(new)), "trionats", "rate")
    assert change.band_pct == pytest.approx(100 * MIN_BAND)
    assert change.verdict == "noise"


def test_latency_figures_are_better_lower() -> None:
    old = {"request": {"trionats": _runs(rate=[10.0, 10.0], p99_ms=[5.0, 5.2])}}
    new = {"request": {"trionats": _runs(rate=[10.0, 10.0], p99_ms=[8.0, 8.2])}}
    changes = compare_reports(_report(old), _report(new))
    assert _one(changes, "trionats", "p99_ms", "request").regression
    back = compare_reports(_report(new), _report(old))
    assert _one(back, "trionats", "p99_ms", "request").verdict == "better"


def test_a_reference_side_getting_worse_is_not_our_regression() -> None:
    old = {"publish": {"raw_uvloop": _runs(rate=[200.0, 200.0])}}
    new = {"publish": {"raw_uvloop": _runs(rate=[100.0, 100.0])}}
    change = _one(compare_reports(_report(old), _report(new)), "raw_uvloop", "rate")
    assert change.verdict == "worse"
    assert not change.ours
    assert not change.regression


def test_one_repetition_borrows_the_other_runs_spread() -> None:
    old = {"publish": {"trionats": _runs(rate=[100.0])}}
    new = {"publish": {"trionats": _runs(rate=[75.0, 80.0, 85.0])}}  # half-range 5
    change = _one(compare_reports(_report(old), _report(new)), "trionats", "rate")
    assert change.band_pct == pytest.approx(10.0)  # 5 for the new run, 5 borrowed
    assert change.change_pct == pytest.approx(-20.0)
    assert change.regression
    within = {"publish": {"trionats": _runs(rate=[85.0, 90.0, 95.0])}}
    change = _one(compare_reports(_report(old), _report(within)), "trionats", "rate")
    assert change.change_pct == pytest.approx(-10.0)
    assert change.verdict == "noise"  # exactly the band is still noise


def test_no_repetitions_on_either_side_means_no_verdict() -> None:
    old = {"publish": {"trionats": _runs(rate=[100.0])}}
    new = {"publish": {"trionats": _runs(rate=[10.0])}}
    change = _one(compare_reports(_report(old), _report(new)), "trionats", "rate")
    assert change.verdict == "unmeasured"
    assert change.band_pct is None
    assert not change.regression


def test_a_zero_old_median_has_no_percentage() -> None:
    old = {"pubsub": {"trionats": _runs(rate=[10.0, 10.0], dropped=[0, 0])}}
    same = compare_reports(_report(old), _report(old))
    assert _one(same, "trionats", "dropped", "pubsub").verdict == "noise"
    new = {"pubsub": {"trionats": _runs(rate=[10.0, 10.0], dropped=[3, 5])}}
    change = _one(compare_reports(_report(old), _report(new)), "trionats", "dropped", "pubsub")
    assert change.change_pct is None
    assert change.band_pct is None
    assert change.regression


def test_only_figures_present_in_both_are_compared() -> None:
    old = {
        "publish": {"trionats": _runs(rate=[1.0, 1.0]), "raw": _runs(rate=[1.0, 1.0])},
        "pool": {"trionats": _runs(rate=[1.0, 1.0])},
    }
    new = {
        "publish": {
            "trionats": _runs(rate=[1.0, 1.0], p50_ms=[1.0, 1.0]),
            "raw": _runs(rate=[1.0, 1.0]),
            "raw_uvloop": _runs(rate=[2.0, 2.0]),
        },
        "request": {"trionats": _runs(rate=[1.0, 1.0])},
    }
    changes = compare_reports(_report(old), _report(new))
    assert [(c.scenario, c.what, c.figure) for c in changes] == [
        ("publish", "trionats", "rate"),
        ("publish", "raw", "rate"),
        ("publish", "ratio", "ratio"),
    ]


def test_a_report_written_before_the_format_was_recorded_is_read() -> None:
    old = {"results": STEADY, "summary": {}, "machine": {"cpu_count": 2}}  # format 1
    assert check_report(old) is old
    changes = compare_reports(old, _report(STEADY))
    assert len(changes) == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a trionats bench report"),
        ({"summary": {}}, "not a trionats bench report"),
        ({"format": "other", "results": {}}, "format 'other'"),
        ({"results": STEADY, "format_version": REPORT_VERSION + 1}, "newer trionats"),
        ({"results": STEADY, "format_version": "2"}, "format_version '2'"),
        ({"results": {"publish": []}}, r"results\['publish'\] is not an object"),
        ({"results": {"publish": {"raw": {"rate": 1}}}}, "is not a list of runs"),
        ({"results": {"publish": {"raw": []}}}, "holds no results"),
    ],
)
def test_check_report_says_what_is_wrong(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_report(data)


def test_load_report_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(BenchError, match=r"cannot read --compare .*missing.json: No such file"):
        load_report(str(missing))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(BenchError, match="is not JSON") as caught:
        load_report(str(garbage))
    assert "\n" not in str(caught.value)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BenchError, match="not a trionats bench report"):
        load_report(str(other))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report(STEADY)))
    assert load_report(str(good))["results"] == STEADY


def test_check_comparable_refuses_another_workload() -> None:
    old = _report(STEADY)
    with pytest.raises(BenchError, match="--size 128, this run with --size 64"):
        check_comparable(old, BenchConfig(size=64), ["publish"])
    with pytest.raises(BenchError, match="--concurrency 100, this run with --concurrency 10"):
        check_comparable(old, BenchConfig(concurrency=10), ["publish"])
    none_in_common = r"none of the scenarios to run \(request\); it has publish"
    with pytest.raises(BenchError, match=none_in_common):
        check_comparable(old, BenchConfig(), ["request"])


def test_check_comparable_warns_about_what_moves_figures() -> None:
    old = _report(STEADY)
    assert check_comparable(old, BenchConfig(count=1000, reps=5), ["publish"]) == []
    warnings = check_comparable(old, BenchConfig(count=2000, reps=1), ["publish"])
    assert any("this run has 1 repetition" in w for w in warnings)
    assert any("other message counts than the old report (publish)" in w for w in warnings)
    old["config"]["reps"] = 1
    old["machine"]["cpu_count"] = 512
    warnings = check_comparable(old, BenchConfig(count=1000), ["publish"])
    assert any("the old report has 1 repetition" in w for w in warnings)
    assert any("ran on 512 CPUs" in w for w in warnings)


def test_a_child_gets_the_server_url_in_its_environment_not_its_argv() -> None:
    """argv is world-readable (ps, /proc/PID/cmdline): a URL's credentials stay out."""
    from trionats._bench import URL_ENV, _child_command

    url = "nats://bench:s3cret@127.0.0.1:4222"
    for loop in ("asyncio", "uvloop"):
        command = _child_command("publish", url, 100, 8, 1, loop)
        assert not any("s3cret" in part for part in command), command
    assert URL_ENV == "TRIONATS_BENCH_URL"


async def test_a_child_reads_the_url_from_its_environment(nats_url: str) -> None:
    from trionats._bench import _child_command, _run_child

    seen: list[int] = []
    result = await _run_child(
        _child_command("publish", nats_url, 200, 8, 1),
        "raw nats-py child (publish, rep 1)",
        lambda what, pid: seen.append(pid),
        nats_url,
    )
    assert result["rate"] > 0
    assert len(seen) == 1
