"""Tensor helpers every adapter's forward and merge share: widening to float32, the fused
y + s·h Mᵀ, and whether a module's output can be seen by a hook."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def widen(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half types widened, float64 kept): weights are summed in this
    dtype and rounded once to the layer's."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def add_product(y: Tensor, h: Tensor, M: Tensor, s: float = 1.0, *, inplace: bool = False) -> Tensor:
    """y + s·h Mᵀ as one GEMM, for any leading dimensions; in y's dtype.

    Out of place (``torch.addmm``, on autocast's lower-precision list, so under autocast it
    casts y, h and M itself), ``y`` is left as it was. ``inplace=True`` adds into ``y`` (one
    pass over the output fewer), for a ``y`` that nothing else can see; in-place ops are not
    autocast's, so h and M are cast to y's dtype here, which is a no-op without autocast.
    """
    y2, h2 = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
    if inplace and y.is_contiguous():  # y2 is a view of y
        y2.addmm_(h2.to(y.dtype), M.mT.to(y.dtype), alpha=s)
        return y  # y, not the view: autograd through a view of a modified tensor costs a pass
    return torch.addmm(y2, h2, M.mT, alpha=s).view(y.shape)


def runs_without_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs no hook: PyTorch's own condition for skipping the hook
    machinery in ``nn.Module.__call__`` (the module's and the global forward, forward-pre,
    backward and backward-pre hooks). Only then is its output a temporary no one else sees: a
    forward hook may keep it, a backward hook returns it as a view of a custom Function."""
    g = nn.modules.module
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )
