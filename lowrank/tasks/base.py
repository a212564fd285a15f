"""The :class:`Task` base class of every task, the :class:`TrainTask` protocol (what the one
training loop needs of a task) with its optional capabilities, and what tasks share.

A task owns a pretrained base model and the fixed train/dev/test splits of its downstream
(adaptation) problem. Training code sees a task only through this interface:

>>> task = lowrank.tasks.get("synthetic")  # doctest: +SKIP
>>> model = lr.inject(
...     task.pretrained(), "lora", targets=task.targets, modules_to_save=task.modules_to_save, rank=4
... )
>>> loss = task.loss(model, next(iter(loader)))  # a batch of task.split("train")
>>> task.evaluate(model, "dev")[task.metric]

``embed`` maps a batch to the continuous input representation z (pixels, word or character
embeddings) and ``head`` maps z to the output, so adversarial training and robust evaluation
perturb z without knowing the task. Batches are the tuples of tensors a ``TensorDataset``
yields; the first tensor is the input, the last the target.

Also here: seeded splits, argument checks and the small MLP of the image tasks (pretraining and
its weight cache are in :mod:`lowrank.tasks.pretrained`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .pretrained import PRETRAIN_SEED
from .protocols import Batch, Perturb

SPLITS = ("train", "dev", "test")


class Task:
    """One downstream problem with its pretrained base model (see the module docstring).

    Subclasses set the class attributes, implement :meth:`build_pretrained`,
    :meth:`make_splits`, :meth:`head` and :meth:`evaluate`, and usually :meth:`embed` and
    :meth:`criterion` (defaults: z = the batch's first tensor; cross-entropy against the last).
    """

    name: ClassVar[str] = ""
    targets: list[str] | str = "all-linear"
    modules_to_save: list[str] = []
    metric: str = ""
    higher_is_better: bool = True
    # What choices (the learning rate) are made on, on the dev split: a metric the model's
    # outputs give, in the same direction as ``metric``; empty means ``metric`` itself.
    selection_metric: str = ""
    # The box the continuous input z lives in (pixels: (0, 1)); attacks stay inside it. None: ℝ.
    input_bounds: tuple[float, float] | None = None
    # LoRA's usual learning rate here: the centre of every variant's default search grid (times
    # the variant's lr_scale; lowrank.arguments.auto_grid). Tasks set it from their committed sweeps.
    lr_centre: float = 1e-2

    def __init__(self) -> None:
        self._base: nn.Module | None = None
        self._splits: dict[str, TensorDataset] | None = None

    # ------------------------------------------------------------------ model and data
    def build_pretrained(self) -> nn.Module:
        """Build (or load from the cache) the pretrained base model; called once per task."""
        raise NotImplementedError

    def make_splits(self) -> dict[str, TensorDataset]:
        """The downstream ``{"train", "dev", "test"}`` datasets; called once per task."""
        raise NotImplementedError

    def pretrained(self) -> nn.Module:
        """A fresh deep copy of the pretrained base model (in train mode, all parameters
        trainable), the same for every call and every run seed."""
        if self._base is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(PRETRAIN_SEED)
                base = self.build_pretrained()
            self._base = base.eval()
        return copy.deepcopy(self._base).train().requires_grad_(True)

    def split(self, name: str) -> TensorDataset:
        """The fixed, seeded ``"train"``, ``"dev"`` or ``"test"`` split of the downstream task."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is unknown; use one of {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self.make_splits()
        return self._splits[name]

    # ------------------------------------------------------------------ the computation
    def embed(self, model: nn.Module, batch: Batch) -> Tensor:
        """The continuous input representation z that attacks perturb (default: the input)."""
        return batch[0].to(model_device(model))

    def head(self, model: nn.Module, z: Tensor, batch: Batch) -> Tensor:
        """The model's output (logits or predictions) computed from z."""
        return model(z)

    def criterion(self, out: Tensor, batch: Batch) -> Tensor:
        """Scalar training loss of the output ``out`` (default: cross-entropy on labels)."""
        return F.cross_entropy(out, batch[-1].to(out.device))

    def loss(self, model: nn.Module, batch: Batch, perturb: Perturb | None = None) -> Tensor:
        """Training loss of ``model`` on ``batch``; ``perturb(z, loss_of_z)`` moves z first."""
        z = self.embed(model, batch)
        if perturb is not None:
            z = perturb(z, lambda z_: self.criterion(self.head(model, z_, batch), batch))
        return self.criterion(self.head(model, z, batch), batch)

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """Every metric of the task on ``split`` (including ``self.metric``), without gradients
        and in eval mode; the model's train/eval modes are restored afterwards."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def outputs(self, model: nn.Module, tensors: Sequence[Tensor], batch_size: int = 512) -> Tensor:
        """``head(embed(batch))`` over ``tensors`` in chunks, concatenated on the CPU (the caller
        puts the model in eval mode, e.g. with :func:`evaluating`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        n, outs = len(tensors[0]), []
        for i in range(0, n, batch_size):
            batch = tuple(t[i : i + batch_size] for t in tensors)
            outs.append(self.head(model, self.embed(model, batch), batch).float().cpu())
        return torch.cat(outs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r})"


class Classification(Task):
    """A task scored by accuracy: every example is right or wrong (:meth:`correct`, in split
    order), and the accuracy :meth:`Task.evaluate` reports is the mean of those scores.
    Subclasses whose batches need care (e.g. padding) override :meth:`predict`."""

    metric = "accuracy"
    higher_is_better = True

    def predict(self, model: nn.Module, split: str, batch_size: int = 512) -> Tensor:
        """The arg-max class of every example of ``split``, in split order (eval mode, no
        gradients; the model's modes are restored)."""
        data = self.split(split).tensors
        with evaluating(model):
            return self.outputs(model, data, batch_size).argmax(-1)

    def correct(self, model: nn.Module, split: str, batch_size: int = 512) -> Tensor:
        """Per example of ``split``, in split order: whether :meth:`predict` is the label."""
        return is_correct(self.predict(model, split, batch_size), self.split(split).tensors[-1])

    def forgetting_metrics(
        self, model: nn.Module, split: str, old: Sequence[Tensor], batch_size: int = 512
    ) -> dict[str, float]:
        """``accuracy`` on the downstream ``split``, ``old_accuracy`` on ``old`` (the same split
        of the pre-training task) and ``forgetting`` = the pretrained model's old accuracy −
        ``old_accuracy`` (the pretrained reference is computed once per split)."""
        reference = self.__dict__.setdefault("_pretrained_old_accuracy", {})
        if split not in reference:
            base = self.pretrained()
            with evaluating(base):
                reference[split] = accuracy(self.outputs(base, old, batch_size), old[1])
        acc = float(self.correct(model, split, batch_size).float().mean())
        with evaluating(model):
            old_acc = accuracy(self.outputs(model, old, batch_size), old[1])
        return {"accuracy": acc, "old_accuracy": old_acc, "forgetting": reference[split] - old_acc}


# ---------------------------------------------------------------------- small shared pieces
def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; every submodule's own mode restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def is_correct(pred: Tensor, labels: Tensor) -> Tensor:
    """Per example, whether the predicted class is the label: the scores accuracy is the mean of."""
    return pred.cpu() == labels.cpu()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label (the mean of :func:`is_correct`)."""
    return float(is_correct(logits.argmax(-1), labels).float().mean())


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of range(n) from a private generator (the global RNG is untouched)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> dict[str, Tensor]:
    """Disjoint seeded train/dev/test indices of range(n): dev and test take ``fractions``."""
    perm = seeded_permutation(n, seed)
    n_dev, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return {"test": perm[:n_test], "dev": perm[n_test : n_test + n_dev], "train": perm[n_test + n_dev :]}


def check_int(name: str, value: Any, low: int, high: int | None = None, none_ok: bool = False) -> None:
    """Raise a one-sentence ValueError unless ``value`` is an int in [low, high]."""
    if value is None and none_ok:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        span = f"between {low} and {high}" if high is not None else f"of at least {low}"
        extra = " (or None for all)" if none_ok else ""
        raise ValueError(f"{name}={value!r} is invalid; pass an integer {span}{extra}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a one-sentence ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        names = ", ".join(map(repr, choices))
        raise ValueError(f"{name}={value!r} is unknown; choose one of {names}")


class MLP(nn.Module):
    """x → (x − shift)/scale → fc1 → act → fc2 → act → out; layer names fixed for ``targets``."""

    def __init__(self, sizes: Sequence[int], act: str = "relu") -> None:
        super().__init__()
        n_in, h1, h2, n_out = sizes
        self.fc1, self.fc2, self.out = nn.Linear(n_in, h1), nn.Linear(h1, h2), nn.Linear(h2, n_out)
        self.act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[act]
        self.register_buffer("shift", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(n_in))

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.shift) / self.scale
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))
