"""Save and load adapters: lowrank's own files and PEFT's, both ways.

Nothing is ever unpickled, and loading is all or nothing: a file that fails leaves the model in
memory as it was. :mod:`~lowrank.io.format` is lowrank's file format (a directory with
``adapter.safetensors`` and ``adapter_config.json``), :mod:`~lowrank.io.load` the
transactional loading both formats share, :mod:`~lowrank.io.peft` PEFT's format.
"""

from .format import CONFIG, FORMAT, FORMAT_VERSION, TENSORS, AdapterFileError, read_adapter_dir, save_adapters
from .load import load_adapters
from .peft import PEFT_CONFIG, PEFT_TENSORS, from_peft, read_peft_dir, to_peft

__all__ = [
    "CONFIG",
    "FORMAT",
    "FORMAT_VERSION",
    "PEFT_CONFIG",
    "PEFT_TENSORS",
    "TENSORS",
    "AdapterFileError",
    "from_peft",
    "load_adapters",
    "read_adapter_dir",
    "read_peft_dir",
    "save_adapters",
    "to_peft",
]
