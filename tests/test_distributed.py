"""Multi-process training on CPU with the gloo backend (2 processes via torch.multiprocessing)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stiefel_sct import SpectralAdam, SpectralLinear

pytestmark = pytest.mark.distributed

STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(SpectralLinear(12, 16, 4), nn.Tanh(), SpectralLinear(16, 6, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 12, generator=gen), torch.randn(STEPS, 8, 6, generator=gen)


def _train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = SpectralAdam(model.parameters(), lr=1e-2)
        xs, ys = _data()
        per = xs.shape[1] // world  # each process takes its slice of every batch
        _train(model, opt, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_a_single_process_on_the_whole_batch(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    single = _model()
    _train(single, SpectralAdam(single.parameters(), lr=1e-2), *_data())
    states = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for name, ref in single.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), name  # every rank holds the same parameters
        assert (states[0][name] - ref).abs().max() <= 1e-5, name


def _sweep_worker(rank, world, port, out_dir, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from experiments import rank_sweep

        cfg = rank_sweep.Config(preset="smoke", **dict(rank_sweep.PRESETS["smoke"], steps=6, batch=4, eval_every=3))
        run = rank_sweep.Run("ddp", "main", 8, 3e-3, 6, "cosine")
        rec = rank_sweep.train_run(run, cfg, data, __import__("pathlib").Path(out_dir))
        torch.save(rec["curve"], os.path.join(out_dir, f"curve{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_rank_sweep_run_under_ddp_equals_one_process(tmp_path, tiny_data):
    from experiments import rank_sweep

    world = 2
    mp.spawn(_sweep_worker, args=(world, _free_port(), str(tmp_path), tiny_data), nprocs=world, join=True)
    cfg = rank_sweep.Config(preset="smoke", **dict(rank_sweep.PRESETS["smoke"], steps=6, batch=4, eval_every=3))
    single = rank_sweep.train_run(rank_sweep.Run("ddp", "main", 8, 3e-3, 6, "cosine"), cfg, tiny_data, tmp_path / "one")
    curves = [torch.load(tmp_path / f"curve{r}.pt", weights_only=True) for r in range(world)]
    assert curves[0] == curves[1]  # every process evaluated the same model
    assert curves[0]["eval_step"] == single["curve"]["eval_step"]
    # Same batches, same math, different summation order: Adam's first steps move every weight by
    # ~lr whatever its gradient's size, so rounding-level gradients (an all-reduced sum of two halves
    # vs one sum) become visible; the curves agree to 1e-4 relative, not bitwise
    close = dict(rtol=1e-4, atol=0)
    assert torch.allclose(torch.tensor(curves[0]["val_loss"]), torch.tensor(single["curve"]["val_loss"]), **close)
    train = [v for v in curves[0]["train_loss"] if v is not None]
    ref = [v for v in single["curve"]["train_loss"] if v is not None]
    assert torch.allclose(torch.tensor(train), torch.tensor(ref), **close)  # the all-reduced batch loss
    shared = torch.load(tmp_path / "ddp.pt", weights_only=True)["model"]  # rank 0's checkpoint = the module's state
    assert set(shared) == set(torch.load(tmp_path / "one" / "ddp.pt", weights_only=True)["model"])
