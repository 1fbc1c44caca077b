"""AdamWeyl under DeepSpeed ZeRO: 2 real CPU ranks (gloo) launched with torchrun, plus in-process checks.

The torchrun scripts batch many checks per launch (DeepSpeed start-up and its one-time ninja build
dominate); each check is reported as its own test here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_weyl
from hf_weyl import AdamWeyl
from hf_weyl.distributed.sigma import _matvec, _rmatvec, _split_piece
from hf_weyl.integrations.deepspeed import SIGMA_MODES, check_deepspeed_config

pytest.importorskip("deepspeed")

SCRIPTS = Path(__file__).parent / "zero_scripts"
ZERO_CHECKS = [f"equal_zero{s}_{m}" for s in (1, 2, 3) for m in SIGMA_MODES] + [
    "equal_zero2_bf16",
    "equal_zero3_bf16",
    "resume_zero2",
    "resume_zero3",
    "inf_one_rank_zero2_fp32",
    "inf_one_rank_zero2_fp32_offload",
    "inf_one_rank_zero2_bf16_unchecked",
    "inf_one_rank_zero2_bf16_unchecked_offload",
    "inf_one_rank_zero3_fp32",
    "layouts_zero1",
    "layouts_zero2",
    "layouts_zero3",
    "refuse_round_robin",
    *[f"offload_zero{s}{pin}" for s in (1, 2, 3) for pin in ("", "_pinned")],
    "offload_zero2_gather",
    "offload_equals_no_offload_zero2",
    "offload_equals_no_offload_zero3",
    "offload_equals_no_offload_zero2_bf16",
    "fused_pieces_zero2",
    "fused_pieces_zero3",
    "fused_pieces_zero2_no_offload",
    "resume_offload_zero2",
    "resume_offload_zero3",
    "refuse_offload_without_keep_line",
    "accelerate_zero2",
    "accelerate_offload_swap_refused",
    "accelerate_offload_before_kept",
    "accelerate_offload_after_kept",
    "accelerate_offload_after_refused",
]
PIECES_CHECKS = ["steady", "whole_rows", "stale_weights", "stale_vectors", "kept_equals_fresh", "tiny_update",
                 "overlap_is_bit_exact", "overlap_nothing_whole_on_one_rank", "all_finite"]
TRAINER_CHECKS = [
    "trainer_zero2_vector_reduce",
    "trainer_zero2_gather",
    "trainer_zero3_vector_reduce",
    "trainer_routes_agree",
    "trainer_optimizers_passed_refused",
    "trainer_optimizers_passed_offload_refused",
    "trainer_zero2_offload",
    "trainer_zero2_offload_pinned",
    "trainer_refuses_offload",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DS_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], timeout: int = 420, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env={**DS_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _torchrun(script: str, out: Path, *args: str, ranks: int = 2, timeout: int = 420,
              env: dict[str, str] | None = None) -> dict[str, str]:
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_free_port()),
                 str(SCRIPTS / script), *args, str(out)], timeout, env)
    if not out.exists():
        pytest.fail(f"{script} wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    return _torchrun("zero_checks.py", tmp_path_factory.mktemp("zero") / "results.json")


@pytest.fixture(scope="module", params=["native", "avx2"])
def pieces_results(request, tmp_path_factory):
    """The checks with the kernel built for this CPU (AVX-512 here: U streamed in pass 1), and built for AVX2 (torch
    told so: ``ATEN_CPU_CAPABILITY``), the loop other CPUs take."""
    env = {} if request.param == "native" else {"ATEN_CPU_CAPABILITY": request.param}
    return _torchrun("pieces_checks.py", tmp_path_factory.mktemp("pieces") / "results.json", env=env)


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    return _torchrun("trainer_route.py", tmp_path_factory.mktemp("trainer") / "results.json")


@pytest.mark.parametrize("stage", [2, 3])
def test_universal_checkpoint_changes_world_size(stage, tmp_path):
    """2 ranks → DeepSpeed checkpoint → ds_to_universal → 1 rank: continues as the single-process run whose
    power-iteration vectors restart cold at the conversion (see tests/zero_scripts/universal_checkpoint.py)."""
    folder = tmp_path / "ckpt"
    saved = _torchrun("universal_checkpoint.py", tmp_path / "save.json", "save", str(folder), str(stage))
    assert saved["result"] == "ok", saved["result"]
    convert = _run(["-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                    "--input_folder", str(folder / "t2"), "--output_folder", str(folder / "t2_universal")])
    assert convert.returncode == 0, convert.stdout[-3000:] + convert.stderr[-3000:]
    loaded = _torchrun("universal_checkpoint.py", tmp_path / "load.json", "load", str(folder), str(stage), ranks=1)
    assert loaded["result"] == "ok", loaded["result"]


@pytest.mark.parametrize("check", ZERO_CHECKS)
def test_zero_two_ranks(zero_results, check):
    assert zero_results.get(check) == "ok", zero_results.get(check, "check did not run")


@pytest.mark.parametrize("check", PIECES_CHECKS)
def test_fused_pieces_two_ranks(pieces_results, check):
    """The fused step on flat partitions of pieces: the kept B_W x_W, its check, the repeat when one rank's weights or
    vectors changed, the all-reduces overlapped with the whole matrices bit for bit as in order
    (tests/zero_scripts/pieces_checks.py)."""
    assert pieces_results.get(check) == "ok", pieces_results.get(check, "check did not run")


@pytest.mark.parametrize("check", TRAINER_CHECKS)
def test_trainer_deepspeed_route(trainer_results, check):
    assert trainer_results.get(check) == "ok", trainer_results.get(check, "check did not run")


# ---------------------------------------------------------------- in-process


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 9), (6, 1)])
def test_piece_products_sum_to_full_products(shape):
    """Summing the partial A·v and Aᵀ·w of any contiguous split gives the full products."""
    m, n = shape
    a = torch.randn(m, n)
    v, w = torch.randn(n), torch.randn(m)
    flat = a.reshape(-1)
    for cuts in ([0, m * n], [0, 3, m * n], [0, 1, n + 2, m * n - 1, m * n], [0, 0, m * n]):
        cuts = sorted(min(c, m * n) for c in cuts)
        av = sum(_matvec(_split_piece(flat[s:e], s, n), m, v) for s, e in zip(cuts, cuts[1:]))
        atw = sum(_rmatvec(_split_piece(flat[s:e], s, n), n, w) for s, e in zip(cuts, cuts[1:]))
        torch.testing.assert_close(av, a @ v)
        torch.testing.assert_close(atw, a.t() @ w)


def test_sigma_mode_validated_at_construction_and_in_optim_args():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="sigma_mode='allreduce'.*vector_reduce.*gather"):
        AdamWeyl(p, sigma_mode="allreduce")
    assert AdamWeyl(p, sigma_mode="gather").param_groups[0]["sigma_mode"] == "gather"
    assert hf_weyl.optimizer_kwargs_from_optim_args("sigma_mode=gather,tau=0.02") == {"sigma_mode": "gather", "tau": 0.02}


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         '"zero_force_ds_cpu_optimizer": false in the DeepSpeed config'),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True},
         '"zero_force_ds_cpu_optimizer": false'),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}, "zero_force_ds_cpu_optimizer": False},
         "device='nvme'"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin_gradients"),
    ],
)
def test_refused_configs(config, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        check_deepspeed_config(config)
    check_deepspeed_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})
    check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                            "zero_force_ds_cpu_optimizer": False})


def test_hf_deepspeed_config_without_the_keep_line_refused_when_optimizer_is_built():
    from transformers.integrations import HfDeepSpeedConfig

    cfg = HfDeepSpeedConfig({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        AdamWeyl([torch.nn.Parameter(torch.randn(3, 3))])
    cfg.config["zero_force_ds_cpu_optimizer"] = False
    AdamWeyl([torch.nn.Parameter(torch.randn(3, 3))])  # the line added: accepted
    del cfg


def test_keep_client_optimizer_line_is_added_only_where_missing():
    from hf_weyl.integrations.deepspeed import keep_client_optimizer_under_offload

    cpu = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert keep_client_optimizer_under_offload(cpu) and cpu["zero_force_ds_cpu_optimizer"] is False
    forced = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True}
    assert not keep_client_optimizer_under_offload(forced) and forced["zero_force_ds_cpu_optimizer"] is True  # the user's
    plain = {"zero_optimization": {"stage": 2}}
    assert not keep_client_optimizer_under_offload(plain) and "zero_force_ds_cpu_optimizer" not in plain


def test_foreign_flat_partition_raises_instead_of_plain_adamw():
    model = torch.nn.Linear(4, 3)
    opt = AdamWeyl(model.parameters())
    flat = torch.zeros(15, requires_grad=True)
    flat.grad = torch.ones(15)
    opt.param_groups[0]["params"] = [flat]  # what a wrapper does, without DeepSpeed's mapping
    with pytest.raises(RuntimeError, match="no DeepSpeed ZeRO fragment mapping"):
        opt.step()


def test_untested_deepspeed_version_warns_instead_of_raising(monkeypatch):
    import deepspeed

    from hf_weyl.integrations.deepspeed import DeepSpeedZeroAdapter

    monkeypatch.setattr(deepspeed, "__version__", "0.42.0")
    with pytest.warns(UserWarning, match=r"tested with DeepSpeed >=0\.19,<0\.20; found 0\.42\.0"):
        DeepSpeedZeroAdapter()


def test_engine_settings_that_cannot_be_read_refuse(monkeypatch):
    """Fail closed: a DeepSpeed attribute missing after an upgrade raises, it never switches a refusal off."""
    from types import SimpleNamespace

    from hf_weyl.integrations import deepspeed as ds

    stage3 = [SimpleNamespace(ds_id=0)]  # ZeRO-3 parameters without the _z3_optimizer back-reference
    with pytest.raises(RuntimeError, match=r"DeepSpeed .* has no SimpleNamespace\._z3_optimizer"):
        ds._check_settings(stage3, stage=3)
    renamed = [SimpleNamespace(_zero_optimizer=SimpleNamespace(cpu_offload=False))]  # no round_robin_gradients
    with pytest.raises(RuntimeError, match="round_robin_gradients"):
        ds._check_settings(renamed, stage=2)
    renamed3 = [SimpleNamespace(ds_id=0, _z3_optimizer=SimpleNamespace(offload_optimizer=True))]  # no swap_optimizer
    with pytest.raises(RuntimeError, match="swap_optimizer"):
        ds._check_settings(renamed3, stage=3)
    nvme = [SimpleNamespace(_z3_optimizer=SimpleNamespace(swap_optimizer=True))]  # bare deepspeed.initialize + NVMe
    with pytest.raises(ValueError, match="nvme"):
        ds._check_settings(nvme, stage=3)
    ds._check_settings([SimpleNamespace(_z3_optimizer=SimpleNamespace(swap_optimizer=False))], stage=3)  # CPU offload


def test_nonfinite_vote_left_to_deepspeed_only_where_its_step_checks(monkeypatch):
    """AdamWeyl skips its own read of the gradient for non-finite values only where DeepSpeed's step() already skips
    such steps (DeepSpeed 0.19: ZeRO-3 always; ZeRO-1/2 when it computes the norm and checks it — any dtype but bf16,
    or bf16 with check_grad_overflow); everywhere else, and for untested DeepSpeed versions, it checks itself."""
    from types import SimpleNamespace

    import deepspeed

    from hf_weyl.integrations.internals.deepspeed import skips_nonfinite_steps

    def zero12(**attrs):
        return [SimpleNamespace(_zero_optimizer=SimpleNamespace(**attrs))]

    monkeypatch.setattr(deepspeed, "__version__", "0.19.1")
    assert skips_nonfinite_steps(zero12(compute_grad_norm=True, dtype=torch.float32, check_grad_overflow=False), 2)
    assert skips_nonfinite_steps(zero12(compute_grad_norm=True, dtype=torch.float16, check_grad_overflow=True), 2)
    assert skips_nonfinite_steps(zero12(compute_grad_norm=True, dtype=torch.bfloat16, check_grad_overflow=True), 2)
    assert not skips_nonfinite_steps(zero12(compute_grad_norm=True, dtype=torch.bfloat16, check_grad_overflow=False), 2)
    assert not skips_nonfinite_steps(zero12(compute_grad_norm=False, dtype=torch.float32, check_grad_overflow=False), 2)
    assert not skips_nonfinite_steps(zero12(dtype=torch.float32), 2)  # an attribute renamed: check ourselves
    assert not skips_nonfinite_steps([SimpleNamespace()], 2)  # the BF16 optimizer marks no parameter
    assert skips_nonfinite_steps([SimpleNamespace(_z3_optimizer=object())], 3)
    assert not skips_nonfinite_steps([SimpleNamespace()], 3)
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    assert not skips_nonfinite_steps(zero12(compute_grad_norm=True, dtype=torch.float32, check_grad_overflow=True), 2)
    assert not skips_nonfinite_steps([SimpleNamespace(_z3_optimizer=object())], 3)


def test_sharded_sigma_is_scale_safe_and_matches_power_iteration(tmp_path):
    """σ of matrices cut into uneven pieces (here all on one rank of a 1-rank gloo group) equals the
    single-device power iteration and never overestimates, at any finite scale."""
    script = tmp_path / "sigma.py"
    script.write_text('''
import torch, torch.distributed as dist
from hf_weyl.core.power_iteration import initial_vector, power_iteration_, vector_length
from hf_weyl.distributed import Pieces, sharded_sigmas
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
gen = torch.Generator().manual_seed(0)
for scale in (3e-45, 1e-30, 1.0, 1e25, 1e36):
    mats = [torch.randn(7, 5, generator=gen) * scale, torch.randn(3, 11, generator=gen) * scale]
    exact = [torch.linalg.matrix_norm(m.double(), 2).item() for m in mats]
    for mode in ("vector_reduce", "gather"):
        vw = [initial_vector(vector_length(m.shape)) for m in mats]
        vu = [v.clone() for v in vw]
        vref = [v.clone() for v in vw]
        for _ in range(20):
            # each matrix as two pieces "from two ranks" would be; here one rank holds all of it
            sw, su = sharded_sigmas([m.reshape(-1) for m in mats], [m.reshape(-1) for m in mats],
                                    Pieces(((7, 5), (3, 11)), (0, 0), (35, 33), None), vw, vu, 1, mode)
            ref = power_iteration_(mats, vref, 1)
            for s, e in zip(sw.tolist(), exact):
                assert s <= e * (1 + 1e-5) + 2**-149, (scale, mode, s, e)  # (σ itself rounds to fp32)
        torch.testing.assert_close(sw, ref, rtol=1e-5, atol=0)
        assert all(torch.isfinite(v).all() for v in vw + vu)
print("ok")
''' % _free_port())
    proc = _run([str(script)], timeout=120)
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
