"""AdamWeyl under PyTorch FSDP2 (and the refusal of FSDP1) on real CPU ranks (gloo) launched with torchrun.

The torchrun script batches many checks per launch (start-up dominates); each check is reported as its
own test here. See tests/fsdp_scripts/fsdp_checks.py for what each one asserts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "fsdp_scripts" / "fsdp_checks.py"
CHECKS = [
    "equal_gpt2_vector_reduce",
    "equal_gpt2_gather",
    "equal_gpt2_split_batch",
    "equal_net_uneven_empty_vector_reduce",
    "equal_net_uneven_empty_gather",
    "equal_net_split_batch",
    "hsdp_replicate2_shard1",
    "hsdp_replicate1_shard2",
    "bf16_gpt2",
    "bf16_net",
    "dcp_resume_bit_identical",
    "layouts",
    "adapter_keeps_no_parameter",
    "refuse_fsdp1_orig_params",
    "refuse_fsdp1_flat_params",
    "comm_formula_vector_reduce",
    "comm_formula_gather",
    "cpu_offload_gpt2",
    "cpu_offload_net",
    "cpu_offload_dcp_resume_bit_identical",
    "accelerate_fsdp2",
    "accelerate_fsdp2_cpu_offload",
]
# The single-process references take the eager step, the arithmetic the FSDP2 adapter runs on its shards (the
# fused CPU step equals it to float rounding: tests/test_optimizer.py), so that `gather` can be checked bit
# for bit. The 1-rank continuation of a 2-rank checkpoint runs with the fused CPU step.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_WEYL_CPU_KERNEL": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str, ranks: int = 2, timeout: int = 600, fused_cpu: bool = False) -> dict[str, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), str(SCRIPT), str(out), *args]
    env = {**ENV, "HF_WEYL_CPU_KERNEL": "1"} if fused_cpu else ENV
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"fsdp_checks.py {args} wrote no results (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# With the fused CPU step: FSDP2's CPU shards past the fresh steps (the pieces kernel on shards), and the σ traffic it
# hands to the collectives.
FUSED_CHECKS = ["fused_shards_gpt2", "fused_shards_net", "fused_shards_cpu_offload", "fused_shards_dcp_resume",
                "fused_shards_uncapped_is_adamw",
                "comm_formula_vector_reduce"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("fsdp") / "results.json", *CHECKS)


@pytest.fixture(scope="module")
def fused_results(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("fsdp_fused") / "results.json", *FUSED_CHECKS, fused_cpu=True)


@pytest.mark.distributed
@pytest.mark.parametrize("check", CHECKS)
def test_fsdp2_two_ranks(results, check):
    assert results.get(check) == "ok", results.get(check, "check did not run")


@pytest.mark.distributed
@pytest.mark.parametrize("check", FUSED_CHECKS)
def test_fsdp2_two_ranks_fused_cpu_step(fused_results, check):
    assert fused_results.get(check) == "ok", fused_results.get(check, "check did not run")


@pytest.mark.distributed
def test_checkpoint_of_two_ranks_continues_on_one(tmp_path):
    """2 ranks save a DCP checkpoint and a full state dict; 1 rank loads each (FSDP2 on a 1-rank mesh, and a
    plain single-process model) and continues as the 2-rank run did."""
    saved = torchrun(tmp_path / "save.json", "save_for_other_world_size", str(tmp_path))
    assert saved["save_for_other_world_size"] == "ok", saved
    loaded = torchrun(tmp_path / "load.json", "load_other_world_size", str(tmp_path), ranks=1, fused_cpu=True)
    assert loaded["load_other_world_size"] == "ok", loaded


@pytest.mark.distributed
def test_trainer_fsdp2_route_matches_one_process(tmp_path):
    """``Trainer(fsdp=..., optim="adamw_weyl")`` on 2 ranks (FSDP2 through accelerate's preparation) ends where
    the same Trainer run on one process does."""
    two = torchrun(tmp_path / "fsdp.json", "trainer_fsdp2", str(tmp_path))
    assert two["trainer_fsdp2"] == "ok", two
    one = torchrun(tmp_path / "single.json", "trainer_single", str(tmp_path), ranks=1)
    assert one["trainer_single"] == "ok", one
