"""synthetic: teacher–student regression with a planted rank-k ΔW*, generated in memory (seeded).

The pretrained base is a random tanh MLP 64 → 64 → 64 → 64 (``fc1``, ``fc2``, ``out``; weights
N(0, 4/fan_in), so pre-activations have standard deviation ≈ 2 and the net is clearly
non-linear); it is the teacher. The downstream teacher adds ΔW* = U diag(σ) Vᵀ of rank k to each
planted layer (U, V orthonormal, σ evenly spaced from 1 to 0.5, ‖ΔW*‖_F = scale·‖W‖_F) and the
targets are its outputs on standard Gaussian inputs. Every weight matrix is square and the
activation strictly monotone, so the outputs determine ΔW*; only the planted layers are targeted
by default, so a student matches the teacher only by learning ΔW*. ``delta_error`` =
‖ΔW − ΔW*‖_F / ‖ΔW*‖_F then measures recovery (1 at ΔW = 0), and an adapter of rank r < k cannot
go below the Eckart–Young floor :meth:`Synthetic.floor`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..adapters.base import Adapter
from .base import MLP, Batch, Task, check_int, evaluating
from .pretrained import PRETRAIN_SEED

LAYERS = ("fc1", "fc2", "out")
GAIN = 2.0  # weight standard deviation × √fan_in


def _gen(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(stream.encode()))


class Synthetic(Task):
    """Teacher–student regression with a planted rank-k ΔW* (see the module docstring).

    Parameters
    ----------
    planted_rank : int
        k, the rank of each planted ΔW* (1 ≤ k ≤ width).
    layers : sequence of str
        The layers that get a ΔW*, among ``fc1``, ``fc2``, ``out``; also the default targets.
    scale : float
        ‖ΔW*‖_F / ‖W‖_F for each planted layer.
    seed : int
        Seed of ΔW* and of the data (the pretrained base does not depend on it).
    n_train, n_dev, n_test : int
        Split sizes.
    noise : float
        Standard deviation of Gaussian noise added to the training targets only.
    width : int
        Input, hidden and output size of the MLP.
    targets : str or list of str, optional
        Override the default targets (``layers``), e.g. ``"all-linear"``.
    """

    name = "synthetic"
    metric = "delta_error"
    higher_is_better = False
    selection_metric = "mse"  # ΔW* is the answer key: never choose on it
    lr_centre = 3e-2  # LoRA chose 0.03–0.1 in the rank ablation (300 steps)

    def __init__(
        self,
        planted_rank: int = 4,
        layers: Sequence[str] = ("fc2",),
        scale: float = 0.5,
        seed: int = 0,
        n_train: int = 4096,
        n_dev: int = 1024,
        n_test: int = 1024,
        noise: float = 0.0,
        width: int = 64,
        targets: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        check_int("width", width, 1)
        check_int("planted_rank", planted_rank, 1, width)
        for opt, n in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
            check_int(opt, n, 1)
        check_int("seed", seed, 0)
        layers = [layers] if isinstance(layers, str) else list(layers)
        bad = [x for x in layers if x not in LAYERS] or ([] if layers else [None])
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r} is invalid; pass distinct names among {LAYERS}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale={scale!r} is invalid; pass a positive number like 0.5")
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise ValueError(f"noise={noise!r} is invalid; pass a standard deviation >= 0")
        self.planted_rank, self.layers, self.scale, self.seed = planted_rank, layers, scale, seed
        self.sizes = {"train": n_train, "dev": n_dev, "test": n_test}
        self.noise, self.width = float(noise), width
        self.targets = list(layers) if targets is None else targets
        self.modules_to_save = []
        base = self.pretrained()
        self.w0 = {n: base.get_submodule(n).weight.detach().clone() for n in layers}
        self.planted: dict[str, Tensor] = {n: self._plant(n, w) for n, w in self.w0.items()}

    def build_pretrained(self) -> nn.Module:
        model = MLP([self.width] * 4, act="tanh")
        gen = torch.Generator().manual_seed(PRETRAIN_SEED)
        with torch.no_grad():
            for layer in (model.fc1, model.fc2, model.out):
                layer.weight.normal_(0.0, GAIN / math.sqrt(layer.in_features), generator=gen)
                layer.bias.normal_(0.0, 0.1, generator=gen)
        return model

    def _plant(self, layer: str, w: Tensor) -> Tensor:
        gen, k = _gen(self.seed, f"planted:{layer}"), self.planted_rank
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], k, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], k, generator=gen, dtype=torch.float64))
        dw = (u * torch.linspace(1.0, 0.5, k, dtype=torch.float64)) @ v.T
        return (dw * (self.scale * w.double().norm() / dw.norm())).float()

    def teacher(self) -> nn.Module:
        """The downstream teacher: the pretrained base with every ΔW* added."""
        model = self.pretrained().eval().requires_grad_(False)
        for n, dw in self.planted.items():
            model.get_submodule(n).weight.add_(dw)
        return model

    def make_splits(self) -> dict[str, TensorDataset]:
        teacher, base, gen = self.teacher(), self.pretrained().eval(), _gen(self.seed, "data")
        splits, self._base_mse = {}, {}
        with torch.no_grad():
            for name, n in self.sizes.items():
                x = torch.randn(n, self.width, generator=gen)
                y = teacher(x)
                if name == "train" and self.noise > 0:
                    y = y + self.noise * torch.randn(y.shape, generator=gen)
                splits[name] = TensorDataset(x, y)
                self._base_mse[name] = F.mse_loss(base(x), y).item()
        return splits

    def criterion(self, out: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(out, batch[-1].to(out.device))

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """``mse``, ``rel_mse`` (mse / the pretrained base's mse) and the :meth:`analysis`."""
        data = self.split(split)
        with evaluating(model):
            pred = self.outputs(model, data.tensors, batch_size)
        mse = F.mse_loss(pred, data.tensors[1]).item()
        return {"mse": mse, "rel_mse": mse / self._base_mse[split], **self.analysis(model)}

    @torch.no_grad()
    def delta(self, model: nn.Module, layer: str) -> Tensor:
        """ΔW of ``layer`` relative to the pretrained weight (an adapter's ``delta_weight()``,
        or W − W₀ for a plain Linear, e.g. after ``lr.strip``)."""
        mod = model.get_submodule(layer)
        if isinstance(mod, Adapter):
            return mod.delta_weight().detach().float().cpu()
        if isinstance(mod, nn.Linear):
            return mod.weight.detach().float().cpu() - self.w0[layer]
        raise TypeError(f"layer {layer!r} is a {type(mod).__name__}; expected a Linear or adapter")

    def analysis(self, model: nn.Module) -> dict[str, float]:
        """``delta_error`` = ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F over the planted layers (and per layer
        as ``delta_error_<layer>`` when several are planted)."""
        err = {n: (self.delta(model, n) - dw).norm().item() ** 2 for n, dw in self.planted.items()}
        ref = {n: dw.norm().item() ** 2 for n, dw in self.planted.items()}
        out = {"delta_error": math.sqrt(sum(err.values()) / sum(ref.values()))}
        if len(self.planted) > 1:
            out.update({f"delta_error_{n}": math.sqrt(err[n] / ref[n]) for n in self.planted})
        return out

    def floor(self, rank: int) -> float:
        """The smallest ``delta_error`` any rank-``rank`` update of each planted layer can
        reach: the Eckart–Young residual √(Σ_{i>r} σᵢ²) / ‖ΔW*‖_F."""
        check_int("rank", rank, 0)
        num = sum(
            (torch.linalg.svdvals(dw.double())[rank:] ** 2).sum().item() for dw in self.planted.values()
        )
        return math.sqrt(num / sum(dw.double().norm().item() ** 2 for dw in self.planted.values()))
