"""The benchmark suite: its workload generator and metrics, and a smoke run of every scenario.

The smoke run checks that each scenario runs end to end (real gRPC servers, Redis, the adapter
manager, transformers + PEFT) and writes well-formed outputs. It never checks a speed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import cli
from bench.metrics import RequestResult, Slo, percentile, summarize
from bench.scenarios import SCENARIOS, params_for
from bench.workload import WorkloadSpec, generate, offline_hits, read_trace, write_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec(**overrides) -> WorkloadSpec:
    base = dict(
        num_adapters=100, alpha=0.3, rate=8.0, cv=1.0, num_requests=50,
        input_len=(8, 64), output_len=(4, 16), vocab_size=258, seed=3,
    )  # fmt: skip
    return WorkloadSpec(**{**base, **overrides})


# --- workload -------------------------------------------------------------------------------------


def test_trace_is_deterministic_and_replays_exactly(tmp_path):
    s = spec()
    first, second = generate(s), generate(s)
    assert first == second
    a = write_trace(tmp_path / "a.jsonl", s, first)
    b = write_trace(tmp_path / "b.jsonl", s, second)
    assert a.read_bytes() == b.read_bytes()
    read_spec, read_requests = read_trace(a)
    assert read_spec == s
    assert read_requests == first
    assert generate(spec(seed=4)) != first


def test_trace_fields_are_in_range():
    s = spec(num_requests=500)
    requests = generate(s)
    assert [r.index for r in requests] == list(range(500))
    assert requests[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(requests, requests[1:]))
    assert all(8 <= len(r.prompt) < 64 for r in requests)
    assert all(4 <= r.output_len < 16 for r in requests)
    assert all(0 <= t < 258 for r in requests for t in r.prompt)
    assert {r.adapter_id for r in requests} <= set(s.adapter_ids())


@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.0])
def test_popularity_follows_the_power_law(alpha):
    """P(adapter 0) = P(power(alpha) < 1/n) = (1/n)**alpha: ~0.63 at 0.1, 0.25 at 0.3, 0.01 uniform."""
    n = 100
    requests = generate(spec(alpha=alpha, num_requests=20_000, input_len=(1, 2), output_len=(1, 2)))
    share = sum(r.adapter_id == "lora-0" for r in requests) / len(requests)
    assert share == pytest.approx((1 / n) ** alpha, abs=0.02)
    if alpha == 1.0:
        counts = np.bincount([int(r.adapter_id.split("-")[1]) for r in requests], minlength=n)
        assert counts.min() > 100 and counts.max() < 300  # expected 200 each


@pytest.mark.parametrize("cv", [1.0, 3.0])
def test_arrivals_have_the_rate_and_cv(cv):
    requests = generate(spec(rate=5.0, cv=cv, num_requests=20_000, input_len=(1, 2), output_len=(1, 2)))
    gaps = np.diff([r.arrival_s for r in requests])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_no_adapters_means_base_model():
    assert {r.adapter_id for r in generate(spec(num_adapters=0))} == {""}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0),
        ("rate", -1),
        ("cv", 0),
        ("num_requests", 0),
        ("input_len", (5, 5)),
        ("output_len", (0, 3)),
    ],
)
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        spec(**{field: value})


def test_the_offline_bound_is_beladys_cache():
    # a b c a b d a, 2 entries: c must come in (a replica serves from its cache), so b goes (asked
    # for later than a); then a hits, b comes back instead of c (never asked again), d instead of
    # b, and a hits again.
    assert offline_hits(list("abcabda"), 2) == 2
    assert offline_hits(list("abcabda"), 4) == 3  # every repeat hits, nothing more
    assert offline_hits(list("abcabda"), 1) == 0
    ids = [r.adapter_id for r in generate(spec(num_requests=400))]
    lru_hits, lru = 0, []
    for a in ids:  # an LRU cache of 8 never beats Belady's of 8
        lru_hits += a in lru
        lru = ([x for x in lru if x != a] + [a])[-8:]
    assert lru_hits <= offline_hits(ids, 8) <= len(ids) - len(set(ids))


def test_read_trace_rejects_other_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a trace file"):
        read_trace(path)


# --- metrics --------------------------------------------------------------------------------------


def test_summarize():
    results = [
        RequestResult(0, "a", 4, 5, arrival_s=0.0, first_token_s=0.5, done_s=1.5),  # tpot 0.25
        RequestResult(1, "b", 4, 3, arrival_s=1.0, first_token_s=3.0, done_s=4.0),  # ttft 2.0, tpot 0.5
        RequestResult(2, "b", 4, 0, arrival_s=2.0, first_token_s=None, done_s=2.5, error="UNAVAILABLE"),
    ]
    s = summarize(results, Slo(ttft_s=1.0, tpot_s=0.3))
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["output_tokens"] == 8
    assert s["makespan_s"] == 4.0 and s["tokens_per_s"] == 2.0
    assert s["ttft_p50_s"] == pytest.approx(1.25)
    assert s["tpot_p99_s"] == pytest.approx(0.25 + 0.99 * 0.25)
    assert s["latency_p50_s"] == pytest.approx(2.25)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert math.isnan(percentile([], 50))


# --- parameters and command line --------------------------------------------------------------------


def test_set_overrides_parse_by_type():
    p = params_for(SCENARIOS["overhead"], smoke=True, overrides=["shapes=512,2048", "repeats=5", "peft=no"])
    assert p.shapes == ("512", "2048") and p.repeats == 5 and p.peft is False
    with pytest.raises(ValueError, match="overhead parameters are"):
        params_for(SCENARIOS["overhead"], smoke=True, overrides=["nope=1"])
    with pytest.raises(ValueError, match="cannot read 'x' as int"):
        params_for(SCENARIOS["overhead"], smoke=True, overrides=["repeats=x"])


def test_list_and_bad_arguments(capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SCENARIOS)
    assert cli.main(["run", "no-such-scenario", "--smoke"]) == 2
    assert cli.main(["run", "overhead", "scale", "--smoke", "--set", "repeats=2"]) == 2


def test_trace_command(tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["trace", "--out", str(out), "--adapters", "10", "--requests", "7", "--input-len", "4,9"]
    assert cli.main(args) == 0
    s, requests = read_trace(out)
    assert s.num_adapters == 10 and len(requests) == 7
    assert requests == generate(s)


# --- the smoke run of every scenario --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results"
    argv = ["run", "all", "--smoke", "--out", str(out)]
    code = cli.main(argv)
    return code, out, argv


def test_smoke_run_succeeds(smoke_run):
    code, out, _ = smoke_run
    assert code == 0, (out / "report.md").read_text()


def test_report_names_machine_command_and_every_scenario(smoke_run):
    _, out, argv = smoke_run
    report = (out / "report.md").read_text()
    assert f"- command: `python -m bench {' '.join(argv)}`" in report
    assert "- machine: " in report and " cores" in report and "torch " in report
    for module in SCENARIOS.values():
        assert f"## {module.TITLE}" in report
    assert "FAILED" not in report
    # vs-peft, swap, step-build, long-context, http-vs-grpc, front-door (overhead's goals: hidden 512/2048 only)
    assert report.count("| goal | measured | target | met |") == 6


def test_results_json_is_strict_and_complete(smoke_run):
    _, out, _ = smoke_run
    data = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # no NaN / Infinity
    assert data["smoke"] is True and data["command"].startswith("python -m bench run all")
    assert {"cpu", "cores", "torch"} <= set(data["machine"])
    assert list(data["scenarios"]) == list(SCENARIOS)
    for name, scenario in data["scenarios"].items():
        assert scenario["tables"], name
        for table in scenario["tables"]:
            assert table["rows"], (name, table["title"])
            assert all(len(row) == len(table["columns"]) for row in table["rows"]), (name, table["title"])
        for goal in scenario["goals"]:
            assert isinstance(goal["met"], bool) and goal["target"] > 0
        for plot in scenario["plots"]:
            assert (out / plot).read_bytes().startswith(PNG_MAGIC), plot


def test_scenario_figures_are_consistent(smoke_run):
    _, out, _ = smoke_run
    s = json.loads((out / "results.json").read_text())["scenarios"]
    overhead = s["overhead"]["data"]["shapes"][0]
    assert all(
        overhead["ratio"][f"{sys}/{phase}/0"] == 1.0
        for sys in ("ours", "peft")
        for phase in ("decode", "prefill")
    )
    summaries = s["vs-peft"]["data"]["summaries"]
    spec_ = s["vs-peft"]["data"]["spec"]
    for system in ("ours", "peft"):
        for summary in summaries[system]:
            assert summary["errors"] == 0 and summary["requests"] == spec_["num_requests"]
    for run in s["scale"]["data"]["runs"]:
        assert run["summary"]["errors"] == 0
        stats = run["cache_stats"]
        assert stats["slot_hits"] + stats["slot_misses"] == run["summary"]["requests"]
    samples = s["swap"]["data"]["samples_s"]
    assert all(len(v) == 3 and min(v) > 0 for v in samples.values())
    http = s["http-vs-grpc"]["data"]
    assert len(http["ratio_per_repeat"]) == 1 and http["ratio_median"] > 0
    door = s["front-door"]["data"]
    for run in door["runs"].values():
        assert run["summary"]["errors"] == 0 and run["summary"]["requests"] == door["params"]["num_requests"]
        assert run["cache"]["slot_hits"] + run["cache"]["slot_misses"] == run["summary"]["requests"]
        flood = run["saturated"]  # the same requests again, all at once
        assert flood["errors"] == 0 and flood["requests"] == door["params"]["num_requests"]
        assert flood["output_tokens"] == run["summary"]["output_tokens"] > 0
    measured = [mode for mode, run in door["runs"].items() if "door_latency" in run]
    assert measured == ["picker"]  # side by side in the picker's cluster: direct, Envoy alone, Envoy + picker
    latency = door["runs"]["picker"]["door_latency"]
    assert latency["direct_p50_s"] > 0
    assert all(latency[d]["door_p50_s"] > 0 for d in ("envoy_alone", "envoy_picker"))
    assert latency["picker_cpu_ms_per_request"] >= 0 and latency["pick_mean_us"] > 0  # CPU: 10 ms ticks
    control = s["control-plane"]["data"]["control_plane"]
    assert control["registered_adapters"] >= 50
    assert all(op["n"] == 5 and 0 < op["p50_ms"] <= op["p99_ms"] for op in control["operations"].values())


def test_replayed_traces_are_saved(smoke_run):
    _, out, _ = smoke_run
    traces = sorted((out / "traces").glob("*.jsonl"))
    assert traces
    for path in traces:
        s, requests = read_trace(path)
        assert requests == generate(s)
