"""Multi-process SCT on CPU (gloo): step time with 1 and 2 processes, and what the sharded
retraction communicates.

A stack of ``--layers`` spectral layers (``--width`` x ``--width``, rank ``--rank``) trains on a
fixed global batch. Configurations, each timed over ``--steps`` steps (median of the last half):

  single   one process (all cores), SpectralAdam
  ddp      ``--procs`` processes, DistributedDataParallel, SpectralAdam (every process retracts every factor)
  fsdp2    ``--procs`` processes, ``stiefel_sct.distributed.shard_model`` (row-sharded factors,
           CholeskyQR2 with all-reduced Gram matrices)

For fsdp2 it also reports the bytes the retraction all-reduced per step (counted by
``sharded_retract_``) against what an all-gather of the factors would move, and the same two
figures computed for the 451M-parameter spectral set of LLaMA-70B shapes at rank 32.

    python -m benchmarks.bench_distributed --layers 8 --width 2048 --rank 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from experiments.common import atomic_write_json, environment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model(args):
    from stiefel_sct import SpectralLinear

    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [SpectralLinear(args.width, args.width, args.rank), nn.Tanh()]
    return nn.Sequential(*layers)


def _steps(model, opt, x, y, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[len(times) // 2:])


def _data(args):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, args.width, generator=gen), torch.randn(args.batch, args.width, generator=gen)


def _worker(rank, world, port, args, kind, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    # an error leaves the group as it is: the peer fails on its next collective and mp.spawn
    # reports this process's traceback (destroying the group first could surface the peer's error)
    from stiefel_sct import SpectralAdam
    from stiefel_sct import distributed as sd

    x, y = _data(args)
    per = args.batch // world
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(_model(args))
    else:
        from torch.distributed.device_mesh import init_device_mesh

        model = sd.shard_model(_model(args), mesh=init_device_mesh("cpu", (world,)))
    opt = SpectralAdam(model.parameters(), lr=1e-3)
    step = _steps(model, opt, x, y, args.steps)
    if rank == 0:  # the optimizer's own counters of its last sharded retraction (None under DDP)
        out.put({"kind": kind, "step_s": step, "retraction": opt.sharded_stats})
    dist.barrier()
    dist.destroy_process_group()
    # End without the interpreter's finalization: after fully_shard, DTensor's caches keep the
    # gloo group and its threads alive past destroy_process_group, and tearing them down at exit
    # sometimes aborts a finished process (SIGABRT, 'terminate called without an active
    # exception'; tests/test_distributed.py measured it). The queue's feeder thread is flushed first.
    out.close()
    out.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seventy_b_bytes(rank: int = 32, layers: int = 80, item: int = 4) -> dict:
    """Per step and pass, the decoder layers' factors of LLaMA-3-70B shapes (q, k, v, o, gate, up,
    down; U and V each): all-reduced Gram bytes vs all-gathered factor bytes."""
    d, f, kv = 8192, 28672, 1024
    rows = {d: 0, f: 0, kv: 0}
    for n in (d, d, d, d, d, d, kv, kv, d, d, f, f, f, d):  # U, V of q, k, v, o, gate, up, down
        rows[n] += layers
    gram = sum(count * rank * rank * item for count in rows.values())
    gather = sum(count * n * rank * item for n, count in rows.items())
    return {"allreduce_bytes_per_pass": gram, "allgather_bytes": gather, "ratio": gather / gram}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if min(args.layers, args.width, args.rank, args.batch, args.steps, args.procs) < 1 or args.batch % args.procs:
        ap.error("all sizes must be >= 1 and --batch divisible by --procs")
    from stiefel_sct import SpectralAdam

    torch.set_num_threads(os.cpu_count() or 1)
    model = _model(args)
    results = {"single": {"step_s": _steps(model, SpectralAdam(model.parameters(), lr=1e-3), *_data(args), args.steps)}}
    ctx = mp.get_context("spawn")
    for kind in ("ddp", "fsdp2"):
        out = ctx.Queue()
        mp.spawn(_worker, args=(args.procs, _free_port(), args, kind, out), nprocs=args.procs, join=True)
        results[kind] = out.get()
    results["llama70b_rank32"] = seventy_b_bytes(args.rank)
    print(f"{args.layers} layers {args.width}x{args.width} rank {args.rank}, batch {args.batch}, "
          f"{os.cpu_count()} cores; median step (ms):")
    for kind in ("single", "ddp", "fsdp2"):
        r = results[kind]
        procs = 1 if kind == "single" else args.procs
        print(f"  {kind:7s} {procs} process(es): {1e3 * r['step_s']:8.1f}")
    ret = results["fsdp2"]["retraction"]
    print(f"  fsdp2 retraction per step: {ret['allreduce_bytes']:,} bytes all-reduced in {ret['collectives']} "
          f"collective(s) vs {ret['allgather_bytes']:,} bytes to all-gather the factors "
          f"({ret['allgather_bytes'] / max(1, ret['allreduce_bytes']):.0f}x); gathered for fallback: {ret['gathered']}")
    b = results["llama70b_rank32"]
    print(f"  LLaMA-70B shapes, rank {args.rank}: {b['allreduce_bytes_per_pass'] / 1e6:.2f} MB all-reduced per pass vs "
          f"{b['allgather_bytes'] / 1e9:.2f} GB to all-gather ({b['ratio']:.0f}x)")
    results["config"] = vars(args)
    results["environment"] = environment()
    if args.out:
        atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
