"""Integrations with other libraries: engine adapters (DeepSpeed ZeRO, PyTorch FSDP2) and the Trainer glue.

Importing this package registers the engine adapters with ``AdamWeyl`` (FSDP2 first: DTensors that
accelerate swaps into a param group are FSDP2's, not ZeRO partitions); each module imports its library
only when it is used, so ``import hf_weyl`` stays torch + transformers.
"""

from . import fsdp  # noqa: I001  (registration order matters)
from . import deepspeed
