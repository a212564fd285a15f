"""One training loop for every variant and task.

AdamW on the trainable parameters, the learning rate warmed up then decayed linearly, gradient-norm
clipping, each adapter's ``penalty()`` added to the loss, optional adversarial regularisation
(FGSM or k-step PGD on the task's continuous input representation: pixels, or word embeddings
for text; Goodfellow et al. 2015, Madry et al. 2018), evaluation on the dev split every epoch,
training hooks called after each optimiser step (e.g. an adapter's rank allocator), and a hard
stop on a non-finite loss. A task is anything that is a :class:`~lowrank.tasks.base.TrainTask`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters.base import Adapter
from .inject import adapters
from .tasks.base import Task, evaluating
from .tasks.protocols import HasAnalysis, HasInputBounds, HasLengths, Perturb, TrainTask

Hook = Callable[[nn.Module, int], None]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainConfig:
    """Everything that defines a training run besides the task, variant and its options."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of steps
    clip: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None  # steps; None: once per epoch
    adversarial: str | None = None  # None | "fgsm" | "pgd"
    adv_eps: float = 0.05
    adv_weight: float = 0.5
    adv_steps: int = 3
    group_by_length: bool = False  # batches of similar-length inputs (tasks with lengths())
    quiet: bool = False

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "warmup": 0 <= self.warmup < 1,
            "adv_weight": 0 <= self.adv_weight <= 1,
            "adv_eps": self.adv_eps >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; see TrainConfig")
        if self.adversarial not in (None, "fgsm", "pgd"):
            raise ValueError(f"adversarial={self.adversarial!r} is unknown; use None, 'fgsm' or 'pgd'")


@dataclass
class TrainResult:
    """What a run measured: final metrics per split, the dev curve, cost."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_mem_mb: float = 0.0
    trainable_params: int = 0


def warmup_linear(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear 0→1 over ⌈warmup·total⌉ steps, then linear 1→0 at total."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the legacy global RNG that user code may use)
    torch.manual_seed(seed)


Bounds = tuple[float, float] | None


def _clip(z: Tensor, bounds: Bounds) -> Tensor:
    return z if bounds is None else z.clamp(*bounds)


def fgsm(eps: float, bounds: Bounds = None) -> Perturb:
    """clip(z + ε·sign(∇_z loss)) to the input's ``bounds`` (e.g. pixels in [0, 1]; None: no box)
    (Goodfellow et al., 2015, arXiv 1412.6572)."""

    def perturb(z: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
        probe = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(probe), probe)
        return _clip(z + (eps * g.sign()).detach(), bounds)

    return perturb


def pgd(eps: float, steps: int = 3, seed: int = 0, bounds: Bounds = None) -> Perturb:
    """k-step projected gradient ascent in the L∞ ball of radius ε intersected with the input's
    ``bounds``, from a uniform random start (a fresh one per call, from a generator seeded once),
    step 2.5ε/k (Madry et al., 2018, arXiv 1706.06083)."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(z: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
        z0 = z.detach()
        noise = torch.rand(z.shape, generator=gen, dtype=z.dtype).to(z.device)
        delta = _clip(z0 + (noise * 2 - 1) * eps, bounds) - z0
        for _ in range(steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(z0 + delta), delta)
            delta = (delta.detach() + 2.5 * eps / steps * g.sign()).clamp(-eps, eps)
            delta = _clip(z0 + delta, bounds) - z0
        return z + delta

    return perturb


def robust_accuracy(
    model: nn.Module, task: Task, split: str, perturb: Perturb | None, batch_size: int = 512
) -> float:
    """Accuracy on ``split`` with every input representation z moved by ``perturb(z, loss)``
    first (None: clean accuracy); eval mode, gradients only with respect to z."""
    tensors = task.split(split).tensors
    correct = 0
    with evaluating(model):
        for i in range(0, len(tensors[0]), batch_size):
            batch = tuple(t[i : i + batch_size] for t in tensors)
            z = task.embed(model, batch)
            if perturb is not None:
                with torch.enable_grad():
                    z = perturb(z, lambda z_, b=batch: task.criterion(task.head(model, z_, b), b))
            out = task.head(model, z, batch)
            correct += int((out.argmax(-1).cpu() == batch[-1]).sum())
    return correct / len(tensors[0])


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 10 ms
    from /proc (Linux); on CUDA, ``torch.cuda.max_memory_allocated`` instead."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):  # no /proc (macOS); ``resource`` is Unix-only, so imported here
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20


def _batches(dataset: Any, batch_size: int, gen: torch.Generator, lengths: Tensor | None = None):
    """Endless shuffled mini-batches of a TensorDataset: a fresh permutation every epoch, the
    incomplete last batch dropped (a set smaller than one batch is one batch). With ``lengths``,
    each epoch's permutation is passed through :func:`length_grouped`."""
    tensors = dataset.tensors
    n = len(tensors[0])
    while True:
        perm = torch.randperm(n, generator=gen)
        if lengths is not None:
            perm = length_grouped(perm, lengths, batch_size, gen)
        for i in range(0, max(n - batch_size, 0) + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield tuple(t[idx] for t in tensors)


def length_grouped(
    perm: Tensor, lengths: Tensor, batch_size: int, gen: torch.Generator, group: int = 8
) -> Tensor:
    """``perm`` reordered so that each batch holds inputs of similar length (less padding):
    every run of ``group`` batches of ``perm`` is sorted by length and cut into batches, and the
    order of the epoch's full batches is shuffled. The remainder (``len(perm) % batch_size``, the
    shortest inputs of the last run) stays last, where the trainer drops it as the incomplete
    batch. The grouped sampler of Hugging Face's ``group_by_length``, with smaller groups."""
    chunks = perm.split(group * batch_size)
    order = torch.cat([c[lengths[c].argsort(descending=True, stable=True)] for c in chunks])
    full = len(order) // batch_size * batch_size
    if full == 0:
        return order
    rows = order[:full].view(-1, batch_size)
    return torch.cat([rows[torch.randperm(len(rows), generator=gen)].flatten(), order[full:]])


def _optimiser(
    params: list[nn.Parameter], config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on ``params``, its learning rate scaled by :func:`warmup_linear` at every step."""
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, config.steps, config.warmup))
    return opt, sched


def _perturbation(task: TrainTask, config: TrainConfig) -> Perturb | None:
    """The attack of ``config.adversarial`` inside the task's input bounds; None: clean training."""
    bounds = task.input_bounds if isinstance(task, HasInputBounds) else None
    if config.adversarial == "fgsm":
        return fgsm(config.adv_eps, bounds)
    if config.adversarial == "pgd":
        return pgd(config.adv_eps, config.adv_steps, config.seed, bounds)
    return None


def _train_lengths(task: TrainTask, config: TrainConfig) -> Tensor | None:
    """The train inputs' lengths when batches are grouped by length (``config.group_by_length``)."""
    if not config.group_by_length:
        return None
    if not isinstance(task, HasLengths):
        raise ValueError(
            f"group_by_length=True needs inputs of varying length; the "
            f"{type(task).__name__} task has none, so leave it False"
        )
    return task.lengths("train")


def _objective(
    model: nn.Module,
    task: TrainTask,
    batch: tuple[Tensor, ...],
    config: TrainConfig,
    perturb: Perturb | None,
    ads: Sequence[Adapter],
) -> Tensor:
    """The minimised loss: (1 − w)·L(batch) + w·L(perturbed batch) (w = ``config.adv_weight``;
    the clean loss alone without ``perturb``), plus every adapter's ``penalty()``."""
    loss = task.loss(model, batch)
    if perturb is not None:
        adv = task.loss(model, batch, perturb=perturb)
        loss = (1 - config.adv_weight) * loss + config.adv_weight * adv
    for ad in ads:
        loss = loss + ad.penalty()
    return loss


def _final_metrics(model: nn.Module, task: TrainTask) -> dict[str, float]:
    """``dev_*`` and ``test_*`` metrics of the trained model, and the task's analysis if it has one."""
    metrics = {f"dev_{k}": v for k, v in task.evaluate(model, "dev").items()}
    metrics.update({f"test_{k}": v for k, v in task.evaluate(model, "test").items()})
    if isinstance(task, HasAnalysis):
        metrics.update(task.analysis(model))
    return metrics


def train(
    model: nn.Module,
    task: TrainTask,
    config: TrainConfig,
    hooks: Sequence[Hook] = (),
    device: str = "cpu",
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``task``'s train split; evaluate dev and test.

    The model is expected to be prepared already (``lr.inject``); the run is deterministic
    given ``config.seed``. Raises :class:`NonFiniteLossError` on a NaN/inf loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; inject adapters first")
    model.to(device).train()
    gen = torch.Generator().manual_seed(config.seed)
    opt, sched = _optimiser(params, config)
    perturb = _perturbation(task, config)
    train_set = task.split("train")
    steps_per_epoch = max(1, len(train_set) // config.batch_size)
    eval_every = config.eval_every or steps_per_epoch
    ads = list(adapters(model).values())
    history: list[dict[str, float]] = []
    quiet = config.quiet or not sys.stderr.isatty()
    batches = _batches(train_set, config.batch_size, gen, _train_lengths(task, config))
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        bar = tqdm(range(config.steps), desc="train", disable=quiet, leave=False)
        for step in bar:
            batch = tuple(t.to(device) for t in next(batches))
            loss = _objective(model, task, batch, config, perturb, ads)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {step} with lr={config.lr:g}; "
                    "lower the learning rate or check the data"
                )
            loss.backward()
            if config.clip:
                nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            for hook in hooks:
                hook(model, step)
            opt.zero_grad(set_to_none=True)
            sched.step()
            if (step + 1) % eval_every == 0 and step + 1 < config.steps:
                history.append({"step": step + 1, **task.evaluate(model, "dev")})
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        seconds = time.perf_counter() - start
        metrics = _final_metrics(model, task)
    history.append({"step": config.steps, **{k[4:]: v for k, v in metrics.items() if k.startswith("dev_")}})
    return TrainResult(
        metrics=metrics,
        history=history,
        train_seconds=seconds,
        peak_mem_mb=mem.peak,
        trainable_params=sum(p.numel() for p in params),
    )
