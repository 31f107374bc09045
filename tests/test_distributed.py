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
