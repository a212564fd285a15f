"""lowrank: LoRA and the other low-rank adaptation methods, compared on one footing.

>>> import lowrank as lr
>>> ad = lr.make("lora", torch.nn.Linear(64, 32), rank=4)  # doctest: +SKIP
"""

from . import analysis, io, linalg, tasks
from ._version import __version__
from .adapters import (
    Adapter,
    LowRankAdapter,
    OptionError,
    RankWarning,
    make,
    register,
    variant_class,
    variants,
)
from .inject import adapters, find_targets, inject, merge_all, num_trainable, strip, unmerge_all
from .io import AdapterFileError, from_peft, load_adapters, save_adapters, to_peft

__all__ = [
    "__version__",
    "Adapter",
    "AdapterFileError",
    "LowRankAdapter",
    "OptionError",
    "RankWarning",
    "adapters",
    "analysis",
    "find_targets",
    "from_peft",
    "inject",
    "io",
    "linalg",
    "load_adapters",
    "make",
    "merge_all",
    "num_trainable",
    "register",
    "save_adapters",
    "strip",
    "tasks",
    "to_peft",
    "unmerge_all",
    "variant_class",
    "variants",
]
