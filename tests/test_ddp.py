"""DDP consistency: whether a step is applied is decided once for all ranks, so a non-finite loss
on one rank never desynchronizes the gradient all-reduces (two gloo processes on the CPU)."""

import multiprocessing
import socket

import torch
import torch.distributed as dist
import torch.nn as nn

from mimir.train.steps import Precision, apply_update

NAN_STEP, STEPS = 1, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, results: "multiprocessing.Queue") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    applied = []
    for step in range(STEPS):
        loss = model(torch.full((8, 4), float(rank + 1 + step))).pow(2).mean()
        if step == NAN_STEP and rank == 1:
            loss = loss * float("nan")  # only rank 1 sees a non-finite loss (fp16 overflow, say)
        applied.append(apply_update(loss, optimizer, Precision.create("fp32", torch.device("cpu")), None))
    check = torch.ones(1)
    dist.all_reduce(check)  # the collectives are still paired: this returns instead of aborting
    results.put((rank, applied, check.item(), [p.detach().clone() for p in model.parameters()]))
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank():
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        outcome = {rank: rest for rank, *rest in (results.get(timeout=60) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    expected = [step != NAN_STEP for step in range(STEPS)]
    for rank in (0, 1):
        applied, check, _ = outcome[rank]
        assert applied == expected, f"rank {rank} applied {applied}"
        assert check == 2.0
    for w0, w1 in zip(outcome[0][2], outcome[1][2]):
        assert torch.equal(w0, w1)
