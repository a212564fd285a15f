"""Training under torch.distributed DDP (2 CPU processes, gloo on loopback): the adapters stay
identical across ranks and equal a single-process run on the combined batch."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank as lr

STEPS, LR = 5, 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return lr.inject(model, "lora", targets=["0", "2"], rank=2, seed=0)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 8, generator=g), torch.randn(STEPS, 8, 4, generator=g)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.detach().clone().contiguous()
        for n, ad in lr.adapters(model).items()
        for k, v in ad.adapter_state().items()
    }


def train(model: nn.Module, xs, ys) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    xs, ys = data()
    half = xs.shape[1] // world  # each rank sees its half of every batch
    train(ddp, xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half])
    save_file(adapter_state(model), f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process_on_the_combined_batch(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = load_file(tmp_path / "rank0.safetensors")
    r1 = load_file(tmp_path / "rank1.safetensors")
    single = make_model()
    train(single, *data())
    ref = adapter_state(single)
    init = adapter_state(make_model())
    assert r0.keys() == r1.keys() == ref.keys()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k  # ranks never diverge
        # DDP averages the two half-batch gradients = the full-batch gradient of the mean
        # loss; float32 sums in another order: 1e-6
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ref[k], init[k]) for k in ref)  # training moved the adapters
