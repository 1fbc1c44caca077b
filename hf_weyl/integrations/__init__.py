"""Integrations with other libraries: engine adapters (DeepSpeed ZeRO, PyTorch FSDP) and the Trainer glue.

Each module imports its library only when it is used, so ``import hf_weyl`` stays torch + transformers.
"""
