"""What the training loop and the sweep ask of a task (typed protocols, probed with
``isinstance``), and the type aliases of a batch and of an input perturbation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import TensorDataset

Batch = Sequence[Tensor]
Perturb = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]


@runtime_checkable
class TrainTask(Protocol):
    """What :func:`lowrank.train.train` needs of a task: its splits, a training loss (with the
    input representation moved by ``perturb`` first, for adversarial training) and its metrics.
    Every :class:`Task` is one; the optional capabilities below are probed with ``isinstance``."""

    def split(self, name: str) -> TensorDataset: ...

    def loss(self, model: nn.Module, batch: Batch, perturb: Perturb | None = None) -> Tensor: ...

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]: ...


@runtime_checkable
class HasInputBounds(Protocol):
    """A task that says which box its continuous input z lives in (None: ℝ); attacks stay inside."""

    input_bounds: tuple[float, float] | None


@runtime_checkable
class HasLengths(Protocol):
    """A task whose inputs vary in length (token counts), so batches can group similar lengths."""

    def lengths(self, split: str) -> Tensor: ...


@runtime_checkable
class HasPerExampleScores(Protocol):
    """A task that scores each example of a split on its headline metric, in split order (a
    classifier: True where the prediction is the label), so two models can be compared on the
    same examples (:func:`lowrank.stats.paired_bootstrap`); the metric is their mean."""

    def correct(self, model: nn.Module, split: str, batch_size: int = 512) -> Tensor: ...


@runtime_checkable
class HasAnalysis(Protocol):
    """A task that measures the trained model beyond :meth:`Task.evaluate` (e.g. against a
    planted ground truth); the columns are added to the run's metrics."""

    def analysis(self, model: nn.Module) -> dict[str, float]: ...
