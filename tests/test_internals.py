"""Other libraries' private attributes are read in one module per library (hf_weyl.integrations.internals), each
read guarded: a missing one fails closed with a message naming the library version."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hf_weyl

PACKAGE = Path(hf_weyl.__file__).parent
INTERNALS = PACKAGE / "integrations" / "internals"

#: Private attributes of DeepSpeed, accelerate, torch.distributed and transformers that hf_weyl reads.
FOREIGN_PRIVATE = {
    "_hp_mapping", "_dp_group", "_zero_optimizer", "_z3_optimizer", "_shared_state", "_attn_implementation",
    "_OPTIMIZER_HANDLERS", "_StridedShard", "FSDP_FLATTENED", "FlatParameter", "_value2member_map_", "_member_map_",
}


def test_foreign_private_attributes_are_read_only_in_internals():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if INTERNALS in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            read = isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in FOREIGN_PRIVATE
            imported = isinstance(node, ast.ImportFrom) and any(a.name in FOREIGN_PRIVATE for a in node.names)
            if read or imported:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"foreign private attributes read outside hf_weyl/integrations/internals: {offenders}"


def test_accelerate_state_renamed_fails_closed_naming_the_version(monkeypatch):
    import accelerate
    import accelerate.state

    from hf_weyl.integrations.deepspeed import check_active_deepspeed_config

    monkeypatch.delattr(accelerate.state.AcceleratorState, "_shared_state")
    with pytest.raises(RuntimeError, match=rf"accelerate {re.escape(accelerate.__version__)} has no AcceleratorState\._shared_state"):
        check_active_deepspeed_config()


def test_strided_shard_without_a_readable_split_factor_fails_closed():
    from types import SimpleNamespace

    import torch

    from hf_weyl.integrations.internals.torch_distributed import split_factor

    assert split_factor(SimpleNamespace(split_factor=2)) == 2
    with pytest.raises(RuntimeError, match=rf"torch {re.escape(torch.__version__)} has no SimpleNamespace\.split_factor"):
        split_factor(SimpleNamespace())
