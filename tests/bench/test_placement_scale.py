"""The simulated placement run (`bench run placement-scale`) at a tiny scale on a real redis-server:
every request is decided, the figures are sane and non-trivial, and the report shows them."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.scenarios import Context, placement_scale

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("placement")
    ctx = Context(out=out, work=out / "work", smoke=True)
    params = placement_scale.Params(adapters=(200,), replicas=(10,), requests=(500,), sample_every=2)
    result = placement_scale.run(ctx, params)
    return out, result, result.data["runs"][0]


def test_every_request_is_decided_and_served(tiny_run):
    _, _, run = tiny_run
    assert run["decided"] == 500
    outcomes = run["outcomes"]
    assert sum(outcomes.values()) == 500
    assert outcomes["cold load"] > 0 and outcomes["slot hit"] > 0  # loads happened and were reused
    assert run["ops"]["request done"]["count"] == 500  # every request ran to its end
    assert 0 < run["ops"]["load landed"]["count"] <= outcomes["cold load"]
    assert run["anomalies"].get("REPORT asked to rejoin", 0) == 0
    assert run["anomalies"].get("HEARTBEAT asked to rejoin or drop", 0) == 0


def test_redis_work_is_counted_and_bounded(tiny_run):
    _, _, run = tiny_run
    ops = run["ops"]
    assert ops["slot hit"]["commands_mean"] == 0  # the picker decides from its cached view
    assert 0 < ops["cold load"]["commands_mean"] < 500  # ACQUIRE and a REPORT, not a scan
    assert 0 < ops["heartbeat"]["commands_mean"] < 500
    # three round trips per heartbeat: the snapshot's records, the script, then the global
    # commands with the change mark (the first also loads the scripts; an idle connection pings)
    assert ops["heartbeat"]["round_trips_mean"] == pytest.approx(3, abs=0.1)
    assert 0 < run["per_request"]["commands"] < 500
    assert 0 < run["per_heartbeat"]["commands"] < 500
    # the sampled means account for what Redis ran while the requests were driven
    drive = run["drive"]
    assert drive["commands_estimated_from_samples"] == pytest.approx(drive["commands_total"], rel=0.35)
    assert run["register"]["commands_per_adapter"] > 1 and run["register"]["outcomes"] == {"ok": 200}
    assert 0 < run["register"]["memory_bytes_per_adapter"] < 20_000


def test_hit_rate_and_latencies_are_sane(tiny_run):
    _, _, run = tiny_run
    hit = run["hit_rate"]
    assert 0 < hit["slot_or_host"] < 1 and 0 <= hit["cold"] <= 1
    assert hit["slot"] + hit["host"] == pytest.approx(hit["slot_or_host"], abs=1e-3)
    capacity = run["capacity"]
    assert capacity["slots"] == 40 and capacity["host_entries"] == 160
    assert 0 < capacity["distinct_adapters_asked"] <= 200
    for name in ("picker pick", "manager acquire", "heartbeat", "report", "view refresh"):
        latency = run["latency"][name]
        assert latency["n"] > 0 and 0 < latency["p50_ms"] <= latency["p99_ms"], name


def test_report_has_the_tables_and_plots(tiny_run):
    out, result, _ = tiny_run
    assert [t.title for t in result.tables][0].startswith("Redis commands per operation")
    assert all(t.rows for t in result.tables)
    for plot in result.plots:
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)
    text = report.render("python -m bench run placement-scale", report.machine(), [result], smoke=True)
    assert "Simulated: the replicas" in text and "200 adapters / 10 replicas" in text
    json.dumps(report._plain(result.data), allow_nan=False)


def test_scales_must_pair_up(tmp_path):
    ctx = Context(out=tmp_path, work=tmp_path, smoke=True)
    with pytest.raises(ValueError, match="pair up"):
        placement_scale.run(ctx, placement_scale.Params(adapters=(10, 20), replicas=(2,), requests=(5,)))
    with pytest.raises(ValueError, match="redis"):
        placement_scale.run(ctx, placement_scale.Params(redis="sentinel"))
