"""Hardening: long-run drift, checkpoints that survive a kill mid-save, clear errors on mismatched checkpoints."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stiefel_sct import SpectralAdam, SpectralLinear, is_stiefel, orthonormality_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ten_thousand_steps_keep_orthonormality_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(16, 12, 4), nn.Tanh(), SpectralLinear(12, 4, 3))
    opt = SpectralAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 16), torch.randn(16, 4)
    worst = 0.0
    for step in range(10_000):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step % 1000 == 999:
            worst = max(worst, *(orthonormality_error(p) for p in model.parameters() if is_stiefel(p)))
    assert worst <= 1e-5


def test_loading_another_rank_names_the_layer_and_both_shapes():
    small = nn.Sequential(SpectralLinear(12, 8, 4))
    big = nn.Sequential(SpectralLinear(12, 8, 6))
    with pytest.raises(RuntimeError, match=r"0\.U.*\[12, 4\].*\[12, 6\]"):
        big.load_state_dict(small.state_dict())


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from conftest import synthetic_documents
    from experiments import data as data_lib, rank_sweep
    data = data_lib.prepare("synthetic", vocab_size=300, cache_dir={cache!r}, documents=synthetic_documents())
    cfg = rank_sweep.Config(preset="smoke", **dict(rank_sweep.PRESETS["smoke"], steps=6, eval_every=2, ckpt_every=2))
    run = rank_sweep.Run("k", "main", 8, 3e-3, 6, "cosine")
    real_save, calls = torch.save, []
    def dying_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write half of it, then die as if killed
            import io
            buf = io.BytesIO(); real_save(obj, buf)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = dying_save
    rank_sweep.train_run(run, cfg, data, __import__("pathlib").Path({ckpt!r}))
""")


@pytest.mark.slow
def test_a_run_killed_mid_save_resumes_from_the_last_good_checkpoint(tmp_path, tiny_data):
    from experiments import rank_sweep

    script = KILLED_RUN.format(root=ROOT, tests=os.path.join(ROOT, "tests"), cache=str(tmp_path / "cache"),
                               ckpt=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed during the second save
    good = torch.load(tmp_path / "killed" / "k.pt", weights_only=True)
    assert good["step"] == 2  # the first checkpoint, untouched by the torn write
    assert (tmp_path / "killed" / ".k.pt.tmp").exists()
    cfg = rank_sweep.Config(preset="smoke", **dict(rank_sweep.PRESETS["smoke"], steps=6, eval_every=2, ckpt_every=2))
    run = rank_sweep.Run("k", "main", 8, 3e-3, 6, "cosine")
    resumed = rank_sweep.train_run(run, cfg, tiny_data, tmp_path / "killed", resume=True)
    straight = rank_sweep.train_run(run, cfg, tiny_data, tmp_path / "straight")
    assert resumed["curve"] == straight["curve"]
