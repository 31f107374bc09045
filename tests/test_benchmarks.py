"""The benchmark scripts' own logic (their figures are measured by running them, not here)."""

import json

import pytest
import torch

from benchmarks import bench_finetune as bf
from benchmarks import profile_step as ps


def _run(method, malloc, step, peak):
    variant = method if malloc == "system" else f"{method}+{malloc}"
    return {"method": method, "variant": variant, "malloc": malloc, "step_s_median": step, "peak_mib": peak,
            "params_total": 10, "params_trainable": 5}


def test_finetune_summary_takes_medians_over_rounds_and_ratios_within_an_allocator():
    runs = [_run("dense", "system", s, 100) for s in (2.0, 4.0, 3.0)]
    runs += [_run("lora_r16", "system", s, 80) for s in (1.5, 1.5, 9.0)]
    runs += [_run("sct_b25", "system", s, p) for s, p in ((1.0, 60), (1.0, 40), (1.0, 50))]
    runs += [_run("sct_b25", "caching", 0.5, 70), _run("dense", "caching", 2.0, 110)]
    out = bf.summarise(runs, ["dense", "lora_r16", "sct_b25"])
    assert out["table"]["dense"]["step_s_median"] == 3.0 and out["table"]["lora_r16"]["step_s_median"] == 1.5
    assert out["table"]["sct_b25"]["peak_mib_median"] == 50
    assert out["ratios"]["dense_over_sct_b25_time"] == pytest.approx(3.0)
    assert out["ratios"]["sct_b25_over_lora_r16_peak"] == pytest.approx(50 / 80)
    assert out["ratios"]["dense_over_sct_b25_time+caching"] == pytest.approx(4.0)
    assert out["ratios"]["sct_b25_system_over_caching_time"] == pytest.approx(2.0)
    assert "lora_r16_over_sct_b25_time+caching" not in out["ratios"]  # no LoRA run under caching
    runs += [_run("sct_b25", "thp", 0.8, 50), _run("dense", "thp", 2.4, 100)]
    out = bf.summarise(runs, ["dense", "lora_r16", "sct_b25"])
    assert out["ratios"]["dense_over_sct_b25_time+thp"] == pytest.approx(3.0)
    assert out["ratios"]["dense_system_over_thp_time"] == pytest.approx(3.0 / 2.4)


def test_finetune_workers_get_their_allocator_settings(monkeypatch):
    """glibc reads its settings at process start: each --malloc mode must be in the worker's environment."""
    import argparse
    import subprocess

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen[env.get("MALLOC_MMAP_MAX_"), env.get("THP_MEM_ALLOC_ENABLE")] = env
        return subprocess.CompletedProcess(cmd, 0, stdout='{"method": "dense"}\n', stderr="")

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(bf.subprocess, "run", fake_run)
    args = argparse.Namespace(weights="random", device="cpu", batch=1, seq=8, steps=1, autocast="none",
                              compile=False, threads=None)
    for mode in bf.MALLOC_MODES:
        assert bf.run_fresh("dense", mode, args) == {"method": "dense"}
    assert set(seen) == {(None, None), ("0", None), (None, "1")}
    assert "glibc.malloc.hugetlb=1" in seen[None, "1"]["GLIBC_TUNABLES"]


def test_finetune_rejects_bad_arguments_by_name(capsys):
    for argv, name in ((["--rounds", "0"], "--rounds"), (["--threads", "0"], "--threads")):
        with pytest.raises(SystemExit):
            bf.main(argv)
        assert name in capsys.readouterr().err


def test_profile_categories_and_a_profiled_step():
    assert ps.category("aten::mm") == "GEMM" and ps.category("aten::_fused_adam_") == "Adam kernels"
    assert ps.category("aten::linalg_cholesky_ex") == "retraction k x k (cholesky, solve, inverse)"
    assert ps.category("aten::silu") == "elementwise, norms, SwiGLU" and ps.category("aten::foo") == "other ops"
    assert ps.category("aten::linalg_vector_norm") == "elementwise, norms, SwiGLU"  # grad clipping, not the retraction
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    text, figures = ps.profile(lambda: torch.nn.functional.silu(a @ b).sum(), gemm_peak=100.0)
    assert "| GEMM |" in text and figures["categories_ms"]["GEMM"] > 0 and figures["gemm_gflops"] > 0
    with pytest.raises(ValueError, match="workload must be"):
        ps.workload("nonsense", 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_benchmark_counts_the_optimizers_sharded_retraction(tmp_path, capsys):
    """A tiny run of bench_distributed: the FSDP2 arm's retraction counters come from the
    optimizer's own call (they were empty once: the counter patched a name SpectralAdam never calls)."""
    from benchmarks import bench_distributed as bd

    out = tmp_path / "dist.json"
    res = bd.main(["--layers", "1", "--width", "16", "--rank", "4", "--batch", "4", "--steps", "2", "--out", str(out)])
    ret = res["fsdp2"]["retraction"]
    assert ret["collectives"] >= 1 and ret["gathered"] == 0
    # one Gram all-reduce per pass of the two 16 x 4 factors, in float32: 2 x 4 x 4 x 4 bytes a pass
    assert ret["allreduce_bytes"] in (128, 256)
    assert ret["allgather_bytes"] == 2 * 16 * 4 * 4
    assert "fsdp2 retraction per step" in capsys.readouterr().out
    assert out.exists() and "environment" in json.loads(out.read_text())


def test_ab_summary_quotes_the_median_of_per_round_ratios():
    from benchmarks import bench_ab

    times = {"baseline": [1.0, 2.0, 4.0], "this": [2.0, 1.0, 2.0], "adam_fused": [0.5] * 3, "gemm_floor": [0.5] * 3}
    out = bench_ab.summarise(times)
    assert out["this_over_baseline"] == pytest.approx(0.5)  # ratios 2, 0.5, 0.5: not 2.0 / 2.0
    assert out["floor_ms"] == pytest.approx(1000.0) and out["this_over_floor"] == pytest.approx(2.0)


def test_ab_benchmark_runs_a_checkout_against_itself(tmp_path):
    import pathlib

    from benchmarks import bench_ab

    root = pathlib.Path(bench_ab.__file__).resolve().parents[1]
    result = bench_ab.main(["--baseline", str(root), "--layers", "1", "--rank", "4", "--rounds", "2",
                            "--out", str(tmp_path / "ab.json")])
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert saved["summary"]["this_over_baseline"] == result["summary"]["this_over_baseline"] > 0
    assert set(saved["summary"]["median_ms"]) == {"baseline", "this", "adam_fused", "gemm_floor"}
    with pytest.raises(SystemExit, match="not found"):
        bench_ab.main(["--baseline", str(tmp_path)])
