"""AdamWeyl on tensor-parallel DTensors — TP alone (2 ranks), FSDP2 × TP on a 2×2 mesh and HSDP × TP on a 2×1×2 mesh
(4 ranks) — on real CPU ranks (gloo) launched with torchrun.

Each torchrun launch batches many checks (start-up dominates); each check is reported as its own test here. See
tests/tp_scripts/tp_checks.py for what each one asserts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "tp_scripts" / "tp_checks.py"
TWO_RANKS = [
    "tp_llama_vector_reduce",
    "tp_llama_gather",
    "tp_net_uneven_empty_vector_reduce",
    "tp_net_uneven_empty_gather",
    "tp_dcp_resume_bit_identical",
    "tp_full_state_dict_to_plain",
    "refuse_partial",
    "fsdp2_shard1_placement",
    "tp_comm_formula_vector_reduce",
    "tp_comm_formula_gather",
    "hf_tp_plan",
]
FOUR_RANKS = [
    "fsdp_tp_llama_vector_reduce",
    "fsdp_tp_llama_gather",
    "fsdp_tp_llama_split_batch",
    "fsdp_tp_net_uneven_empty_vector_reduce",
    "fsdp_tp_net_uneven_empty_gather",
    "hsdp_tp_llama_rep2_shard1_tp2",
    "hsdp_tp_net_rep2_shard1_tp2_gather",
    "fsdp_tp_bf16",
    "fsdp_tp_dcp_resume_and_load_4x1",
    "refuse_strided_without_torch_support",
    "fsdp_tp_comm_formula_vector_reduce",
    "fsdp_tp_comm_formula_gather",
]
# Eager reference step (the arithmetic the DTensor adapter runs on its shards); accelerate on the CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_WEYL_CPU_KERNEL": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, checks: list[str], ranks: int, timeout: int = 900) -> dict[str, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), str(SCRIPT), str(out), *checks]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"tp_checks.py on {ranks} ranks wrote no results (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("tp2") / "results.json", TWO_RANKS, ranks=2)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("tp4") / "results.json", FOUR_RANKS, ranks=4)


@pytest.mark.distributed
@pytest.mark.parametrize("check", TWO_RANKS)
def test_tensor_parallel_two_ranks(two, check):
    assert two.get(check) == "ok", two.get(check, "check did not run")


@pytest.mark.distributed
@pytest.mark.parametrize("check", FOUR_RANKS)
def test_fsdp2_times_tensor_parallel_four_ranks(four, check):
    assert four.get(check) == "ok", four.get(check, "check did not run")
