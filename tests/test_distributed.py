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


SHAPES = [(10, 3), (10, 3), (7, 2), (33, 4)]


def _factors(dtype):
    """Factors one optimizer step off the manifold, plus a rank-deficient one (Householder fallback)."""
    from stiefel_sct import retract

    gen = torch.Generator().manual_seed(3)
    out = [retract(torch.randn(n, k, generator=gen, dtype=dtype)) + 1e-2 * torch.randn(n, k, generator=gen, dtype=dtype)
           for n, k in SHAPES]
    out[1][:, 2] = out[1][:, 0]  # a repeated column: rank 2 of 3
    return out


def _sharded_worker(rank, world, port, out_dir, dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from stiefel_sct.distributed import sharded_retract_

        mine = [torch.tensor_split(x, world, dim=0)[rank].clone() for x in _factors(dtype)]  # uneven row shards
        stats = sharded_retract_([(m, s) for m, s in zip(mine, SHAPES)])
        torch.save({"rows": mine, "stats": stats}, os.path.join(out_dir, f"shard{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sharded_cholqr2_equals_the_unsharded_retraction(tmp_path, dtype, tol):
    from stiefel_sct import orthonormality_error, retract

    world = 2
    mp.spawn(_sharded_worker, args=(world, _free_port(), str(tmp_path), dtype), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"shard{r}.pt", weights_only=True) for r in range(world)]
    for i, x in enumerate(_factors(dtype)):
        gathered = torch.cat([p["rows"][i] for p in parts])
        assert orthonormality_error(gathered) <= tol
        assert (gathered - retract(x, "cholqr2")).abs().max() <= 10 * tol
    stats = parts[0]["stats"]
    assert stats == parts[1]["stats"]  # both processes took the same decisions
    assert stats["gathered"] == 1  # only the rank-deficient factor was gathered
    # per shape group one all-reduce of B k^2 numbers (a second only where a pass was needed)
    item = torch.finfo(dtype).bits // 8
    assert stats["allreduce_bytes"] <= 2 * (2 * 9 + 4 + 16) * item
    assert stats["allgather_bytes"] == sum(n * k for n, k in SHAPES) * item
