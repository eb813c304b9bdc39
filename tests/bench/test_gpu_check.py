"""bench.gpu_check without a GPU: it refuses in one line, and its parts run on CPU.

The parity and graphs checks and the throughput table run the same code on CPU (where the engine
ignores enforce_eager), on the tiny model; nothing pretends to be a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, gpu_parity
from bench.gpu_check import Plan

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal shown without CUDA")
def test_without_cuda_it_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == gpu_check.NO_CUDA + "\n"
    assert result.stdout == ""


def test_out_defaults_to_the_OUT_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).out == tmp_path
    monkeypatch.delenv("OUT")
    args = gpu_check.parse_args(["--quick"])
    assert args.out == Path("results/gpu-check") and args.quick and args.work is None


def test_kernel_sweep_reports_pytest_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gpu_check, "KERNEL_TESTS", ("tests/kernels/test_paged_attention.py::test_bad_shapes_are_refused",)
    )
    (check,) = gpu_check.kernel_sweep(tmp_path, gpu_sweep=True)
    assert check.passed and "1 passed" in check.detail
    monkeypatch.setattr(gpu_check, "KERNEL_TESTS", ("tests/kernels/test_paged_attention.py::missing",))
    (check,) = gpu_check.kernel_sweep(tmp_path, gpu_sweep=False)
    assert not check.passed and "not found" in (tmp_path / "kernel_tests.log").read_text()


def test_table_rows_and_markdown():
    assert gpu_check.distinct_adapters(1, (0, 8, 32)) == [0, 1]
    assert gpu_check.distinct_adapters(64, (0, 8, 32)) == [0, 8, 32]
    assert gpu_check.mix(["a", "b", "c"], 4, 2) == ["a", "b", "a", "b"]
    assert gpu_check.mix(["a"], 2, 0) == [None, None]
    text = gpu_check.markdown_table([dict(context=512, batch=8, adapters=8, eager=1000.0, graphs=1500.0)])
    assert text.splitlines()[2] == "| 512 | 8 | 8 | 1,000 | 1,500 | 1.50 |"


def test_compare_decodes_allows_near_ties_only():
    logits = torch.tensor([0.0, 1.0, 0.99, -1.0])
    same = [[(1, logits), (2, logits)]]
    assert gpu_parity.compare_decodes(same, same, tol=0.02) == (0.0, 0)
    near_tie = [[(2, logits + 0.001), (0, logits)]]  # 2 is within 0.02 of the argmax 1
    err, diverged = gpu_parity.compare_decodes(same, near_tie, tol=0.02)
    assert diverged == 0 and err == pytest.approx(0.001, abs=1e-6)
    assert gpu_parity.compare_decodes(same, [[(3, logits), (2, logits)]], tol=0.02)[1] == 1
    assert gpu_parity.compare_decodes(same, [[(1, logits)]], tol=0.02)[1] == 1  # a row ended early


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-check-work")


def test_parity_and_graphs_checks_pass_on_cpu(work):
    checks = gpu_parity.parity_checks(work, "tiny", "cpu") + gpu_parity.graphs_checks(work, "tiny", "cpu")
    assert [c.name.split(": ")[1] for c in checks] == [
        "prefill logits",
        "decode logits",
        "greedy tokens",
        "adapters visible",
        "CUDA graphs vs eager",
    ]
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_parity_fails_when_the_engine_loses_its_adapters(work, monkeypatch):
    run_engine = gpu_parity.run_engine

    def without_adapters(model_dir, adapters, rows, device):
        return run_engine(model_dir, adapters, [(ids, None) for ids, _ in rows], device)

    monkeypatch.setattr(gpu_parity, "run_engine", without_adapters)
    checks = {c.name.split(": ")[1]: c for c in gpu_parity.parity_checks(work, "tiny", "cpu")}
    assert not checks["prefill logits"].passed and not checks["decode logits"].passed
    assert checks["adapters visible"].passed


def test_throughput_table_on_cpu(work, tmp_path):
    plan = Plan(
        False, (), "tiny", batches=(1, 4), contexts=(8, 40), adapters=(0, 2), decode_steps=2, repeats=1
    )
    (check,) = gpu_check.table_checks(tmp_path, plan, work, "cpu")
    rows = check.figures["rows"]
    assert [(r["context"], r["batch"], r["adapters"]) for r in rows] == [
        (c, b, n) for c in (8, 40) for b in (1, 4) for n in ((0, 1) if b == 1 else (0, 2))
    ]
    assert all(r["eager"] > 0 and r["graphs"] > 0 for r in rows)
    assert "| context | batch |" in (tmp_path / "table.md").read_text()
