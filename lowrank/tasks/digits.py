"""digits: scikit-learn's bundled 8×8 digits (``sklearn.datasets.load_digits``, 1,797 images).

An MLP 64 → 128 → 128 → 10 (standardised inputs, ReLU) is pretrained on classes 0–4; the
downstream task is classes 5–9 with the same 10-way head (labels keep their identities).
Pixels are scaled to [0, 1] and standardised inside the model, so ``embed`` returns pixels.
Each class is split 60/20/20 into train/dev/test with a fixed seed; ``old_accuracy`` is
measured on the same split of classes 0–4 and ``forgetting`` is the pretrained model's
old accuracy minus the current one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .base import MLP, SPLITS, Classification, check_int, seeded_permutation
from .pretrained import cached_pretrained, pretrain

SPLIT_SEED = 0
OLD, NEW = range(0, 5), range(5, 10)


def _load() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def _stratified(y: Tensor, classes: range) -> dict[str, Tensor]:
    """Per class: 20 % test, 20 % dev, the rest train (seeded)."""
    out: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for c in classes:
        idx = (y == c).nonzero().flatten()
        idx = idx[seeded_permutation(len(idx), SPLIT_SEED + c)]
        k = round(0.2 * len(idx))
        out["test"].append(idx[:k])
        out["dev"].append(idx[k : 2 * k])
        out["train"].append(idx[2 * k :])
    return {s: torch.cat(v).sort().values for s, v in out.items()}


class Digits(Classification):
    """Pretrain on digits 0–4, adapt to 5–9 (see the module docstring).

    Parameters
    ----------
    pretrain_steps : int
        Adam steps (batch 64, lr 1e-3) of pretraining on classes 0–4.
    hidden : int
        Width of the two hidden layers.
    """

    name = "digits"
    lr_centre = 3e-2  # LoRA chose 0.003 (r = 64) … 0.1 (r = 1) in the rank ablation and spectra
    # The two hidden layers; the 10-way head stays frozen, so ranks up to 128 are admissible
    # and every variant must re-purpose the features the head already reads.
    targets = ["fc1", "fc2"]
    modules_to_save: list[str] = []
    input_bounds = (0.0, 1.0)  # pixels

    def __init__(self, pretrain_steps: int = 1500, hidden: int = 128) -> None:
        super().__init__()
        check_int("pretrain_steps", pretrain_steps, 1)
        check_int("hidden", hidden, 1)
        self.pretrain_steps, self.hidden = pretrain_steps, hidden
        x, y = _load()
        old, new = _stratified(y, OLD), _stratified(y, NEW)
        self.old = {s: TensorDataset(x[i], y[i]) for s, i in old.items()}
        self.new = {s: TensorDataset(x[i], y[i]) for s, i in new.items()}

    def build_pretrained(self) -> nn.Module:
        model = MLP([64, self.hidden, self.hidden, 10])
        x, y = self.old["train"].tensors
        model.shift.copy_(x.mean(0))
        model.scale.copy_(x.std(0).clamp_min(0.1))  # rarely-inked pixels are not blown up
        options = {"pretrain_steps": self.pretrain_steps, "hidden": self.hidden}
        return cached_pretrained(
            self.name,
            options,
            model,
            lambda m: pretrain(m, self.loss, (x, y), self.pretrain_steps, batch_size=64, lr=1e-3),
        )

    def make_splits(self) -> dict[str, TensorDataset]:
        return dict(self.new)

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """``accuracy`` on classes 5–9, ``old_accuracy`` on 0–4, ``forgetting``."""
        return self.forgetting_metrics(model, split, self.old[split].tensors, batch_size)
