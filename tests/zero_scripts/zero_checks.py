"""Checks of AdamWeyl under DeepSpeed ZeRO on 2 real ranks (gloo, CPU), batched in one launch.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/zero_scripts/zero_checks.py OUT.json [CHECK ...]

Each check writes "ok" or its error into OUT.json (rank 0); ``tests/test_zero.py`` asserts on them.
The reference is the single-process AdamWeyl on the full batch (same init, data, clipping, accumulation).
"""

from __future__ import annotations

import os
import sys
import tempfile

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from layout_net import BATCH as LAYOUT_BATCH  # noqa: E402
from layout_net import LayoutNet, layout_batch, layout_groups, layout_loss, layout_reference  # noqa: E402
from rank_checks import KernelRecorder, run_checks, stats_by_name  # noqa: E402

import hf_weyl  # noqa: E402
from hf_weyl import AdamWeyl, unwrap_adamweyl  # noqa: E402

WORLD = 2
MICRO = 4  # per rank
GAS = 2
LR, TAU = 0.05, 0.01


class Net(nn.Module):
    """a.weight (24×12, tall) lies wholly on rank 0 under ZeRO-1/2, b.weight (10×24, wide) is split
    between the ranks; c is a 1×1 matrix of which rank 1 holds nothing under ZeRO-3."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 24, bias=False)
        self.b = nn.Linear(24, 10)
        self.c = nn.Parameter(torch.full((1, 1), 1.3))
        self.norm = nn.LayerNorm(10)
        self.d = nn.Linear(10, 3, bias=False)

    def forward(self, x):
        return self.d(self.norm(self.b(torch.tanh(self.a(x))))) * self.c


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def groups(model, **kw):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


def batch(step, micro, rank=None):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(WORLD * MICRO, 12, generator=g)
    y = torch.randn(WORLD * MICRO, 3, generator=g)
    if rank is None:
        return x, y
    return x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def ds_config(stage, **extra):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    for k, v in extra.items():
        if k == "zero":
            cfg["zero_optimization"].update(v)
        else:
            cfg[k] = v
    return cfg


def reference(steps, sigma_mode="vector_reduce", before_step=None):
    """Single-process AdamWeyl: (model, optimizer) after ``steps`` steps; ``before_step(step, opt)`` may
    change the optimizer before each step."""
    model = make_model()
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95))
    for step in range(steps):
        if before_step is not None:
            before_step(step, opt)
        for micro in range(GAS):
            x, y = batch(step, micro)
            (loss_fn(model, x, y) / GAS).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model, opt



def full_weights(engine_or_model, stage):
    model = getattr(engine_or_model, "module", engine_or_model)
    params = list(model.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def train_ds(engine, steps, first_step=0, poison=None):
    rank = dist.get_rank()
    for step in range(first_step, first_step + steps):
        for micro in range(GAS):
            x, y = batch(step, micro, rank)
            dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
            loss = loss_fn(engine, x.to(dtype), y.to(dtype))
            if poison is not None and poison == (step, rank):
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()


def make_engine(stage, sigma_mode="vector_reduce", seed=0, **cfg_extra):
    model = make_model(seed)
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95), sigma_mode=sigma_mode)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, **cfg_extra))
    return engine


def assert_close(got, want, rtol=1e-6, atol=1e-7, what=""):
    for name in want:
        g, w = got[name], want[name]
        if not torch.allclose(g, w, rtol=rtol, atol=atol):
            err = ((g - w).abs() / (w.abs() + atol)).max()
            raise AssertionError(f"{what}{name}: max relative difference {float(err):.3g}")


#: CPU optimizer offload as AdamWeyl runs under it (``zero_force_ds_cpu_optimizer: false`` keeps the client optimizer).
def offload(pin_memory=False):
    return {"zero": {"offload_optimizer": {"device": "cpu", "pin_memory": pin_memory}}, "zero_force_ds_cpu_optimizer": False}


def check_equal(stage, mode, steps=3, **cfg):
    engine = make_engine(stage, mode, **cfg)
    train_ds(engine, steps)
    ref_model, ref_opt = reference(steps)
    got = full_weights(engine, stage)
    assert_close(got, dict(ref_model.named_parameters()), what=f"ZeRO-{stage} {mode} weights ")
    ref_stats, ds_stats = stats_by_name(ref_model, ref_opt), stats_by_name(engine.module, engine.optimizer)
    assert set(ds_stats) == set(ref_stats), (sorted(ds_stats), sorted(ref_stats))
    assert any(r < 1 for r, *_ in ref_stats.values()), "the cap never bound: the test would not see wrong σ's"
    for name, (r, sw, su, c) in ref_stats.items():
        r2, sw2, su2, c2 = ds_stats[name]
        assert c == c2, name
        for a, b, what in ((r, r2, "ratio"), (sw, sw2, "sigma_w"), (su, su2, "sigma_u")):
            assert abs(a - b) <= 1e-6 * abs(a) + 1e-7, f"{name} {what}: single {a} vs ZeRO-{stage} {b}"
    # the optimizer really ran the ZeRO form on flat partitions
    assert all(len(g["params"]) <= 1 for g in unwrap_adamweyl(engine.optimizer).param_groups)


def reference_bf16(steps):
    """Mixed precision as DeepSpeed's bf16 mode does it: bf16 forward/backward, fp32 master weights and
    AdamWeyl state. Gradients are summed in fp32 here; DeepSpeed's own accumulation and reduction
    rounding differ, so the comparison is at bf16 tolerance."""
    master = make_model()
    work = make_model().to(torch.bfloat16)
    opt = AdamWeyl(groups(master), lr=LR, tau=TAU, betas=(0.9, 0.95))
    for step in range(steps):
        with torch.no_grad():
            for w, m in zip(work.parameters(), master.parameters()):
                w.copy_(m)
        grads = [torch.zeros_like(m) for m in master.parameters()]
        for micro in range(GAS):
            x, y = batch(step, micro)
            work.zero_grad()
            (loss_fn(work, x.bfloat16(), y.bfloat16()) / GAS).backward()
            for g, w in zip(grads, work.parameters()):
                g += w.grad.float()
        for m, g in zip(master.parameters(), grads):
            m.grad = g
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return master, opt


def check_equal_bf16(stage, steps=3, tol=2e-2):
    engine = make_engine(stage, bf16={"enabled": True})
    train_ds(engine, steps)
    ref_model, ref_opt = reference_bf16(steps)
    got = full_weights(engine, stage)
    for name, want in ref_model.named_parameters():
        g = got[name].float()
        err = float((g - want).norm() / want.norm())
        assert err < tol, f"ZeRO-{stage} bf16 {name}: relative difference {err:.3g} (tolerance {tol})"
    ref_stats, ds_stats = stats_by_name(ref_model, ref_opt), stats_by_name(engine.module, engine.optimizer)
    assert any(r < 1 for r, *_ in ref_stats.values()), "the cap never bound"
    for name, (r, sw, su, c) in ref_stats.items():
        r2, sw2, su2, c2 = ds_stats[name]
        assert c == c2, name
        for a, b, what in ((r, r2, "ratio"), (sw, sw2, "sigma_w"), (su, su2, "sigma_u")):
            assert abs(a - b) <= tol * abs(a) + 1e-6, f"{name} {what}: single {a} vs ZeRO-{stage} bf16 {b}"


def check_resume(stage, **cfg):
    ckpt = os.path.join(tempfile.gettempdir(), f"hf_weyl_zero_resume_{stage}_{os.environ.get('MASTER_PORT', '0')}")
    engine = make_engine(stage, **cfg)
    train_ds(engine, 2)
    engine.save_checkpoint(ckpt, tag="t2")
    train_ds(engine, 2, first_step=2)
    want = full_weights(engine, stage)
    want_vectors = [
        s["zero_weyl"]["vectors"].clone() for s in unwrap_adamweyl(engine.optimizer).state.values() if "zero_weyl" in s
    ]
    engine2 = make_engine(stage, seed=123, **cfg)  # different init: everything must come from the checkpoint
    engine2.load_checkpoint(ckpt, tag="t2")
    train_ds(engine2, 2, first_step=2)
    got = full_weights(engine2, stage)
    for name in want:
        assert torch.equal(got[name], want[name]), f"ZeRO-{stage} resume: {name} differs"
    got_vectors = [
        s["zero_weyl"]["vectors"] for s in unwrap_adamweyl(engine2.optimizer).state.values() if "zero_weyl" in s
    ]
    assert len(got_vectors) == len(want_vectors) > 0
    assert all(torch.equal(a, b) for a, b in zip(got_vectors, want_vectors)), "power-iteration vectors differ"
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)


def check_inf_one_rank(stage, ds_skips=True, votes=False, **cfg):
    """Rank 1 alone gets an inf loss: both ranks must skip the step (DeepSpeed's own overflow check, or,
    where DeepSpeed does not check — bf16 with check_grad_overflow=false — AdamWeyl's reduced check). AdamWeyl's own
    check runs (``votes``) unless it can see that DeepSpeed's step checks: ZeRO-3, and ZeRO-1/2 under offload (in
    DeepSpeed 0.19 only then do the parameters carry their ZeRO optimizer)."""
    import hf_weyl.integrations.deepspeed as ds

    seen = []
    real = ds.nonfinite_anywhere
    ds.nonfinite_anywhere = lambda *a, **k: seen.append(1) or real(*a, **k)
    try:
        engine = make_engine(stage, **cfg)
        train_ds(engine, 1)
        before = full_weights(engine, stage)
        train_ds(engine, 1, first_step=1, poison=(1, 1))  # rank 1 only
        after = full_weights(engine, stage)
    finally:
        ds.nonfinite_anywhere = real
    assert (engine.skipped_steps == 1) == ds_skips, f"DeepSpeed skipped_steps={engine.skipped_steps}"
    assert bool(seen) == votes, f"AdamWeyl's own non-finite vote ran {len(seen)} times (expected: {votes})"
    for name in before:
        assert torch.equal(before[name], after[name]), f"ZeRO-{stage} {cfg}: {name} changed on a non-finite step"
    train_ds(engine, 1, first_step=2)
    final = full_weights(engine, stage)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[n], after[n]) for n in final), "training did not continue after the skip"


def check_offload_equals_no_offload(stage, steps=3, **cfg):
    """The same ZeRO stage with and without CPU optimizer offload ends with the same weights and stats."""
    runs = []
    for extra in ({}, offload()):
        engine = make_engine(stage, **{**cfg, **extra})
        train_ds(engine, steps)
        weyl = unwrap_adamweyl(engine.optimizer)
        assert weyl.last_stats is not None and weyl.last_stats.engine == "deepspeed_zero"
        runs.append((full_weights(engine, stage), stats_by_name(engine.module, engine.optimizer)))
    (w0, s0), (w1, s1) = runs
    assert any(r < 1 for r, *_ in s0.values()), "the cap never bound"
    tol = 1e-6
    assert_close(w1, w0, rtol=tol, atol=tol * 0.1, what=f"ZeRO-{stage} offload vs no offload {cfg} ")
    for name in s0:
        assert abs(s0[name][0] - s1[name][0]) <= tol * 10, f"{name} lr ratio {s0[name][0]} vs {s1[name][0]}"


def check_fused_pieces(stage, **cfg):
    """Past the fresh steps, a CPU fp32 partition takes the fused kernel on its pieces (three passes, two vector
    all-reduces, overlapped with the matrices each rank holds whole): weights and stats equal to the eager ZeRO step (HF_WEYL_CPU_KERNEL=0) and to the single-process
    run to float rounding, with the cap binding. Inside DeepSpeed's step the kept B_W x_W is used from the second
    fused step of each partition on and always found valid (nothing between steps touches the fp32 partition)."""
    import hf_weyl.core.functional as fn
    from hf_weyl.core.functional import FRESH_STEPS

    steps = FRESH_STEPS + 4
    rec = KernelRecorder()
    real = fn._fused_pieces_step
    fn._fused_pieces_step = lambda kernel, *a, **k: real(rec.around(kernel), *a, **k)
    runs = []
    try:
        for disabled in ("0", "1"):  # the eager ZeRO step, then the fused one
            os.environ["HF_WEYL_CPU_KERNEL"] = disabled
            engine = make_engine(stage, **cfg)
            train_ds(engine, steps)
            runs.append((full_weights(engine, stage), stats_by_name(engine.module, engine.optimizer)))
    finally:
        os.environ.pop("HF_WEYL_CPU_KERNEL", None)
        fn._fused_pieces_step = real
    assert rec.steps, "the fused ZeRO step never ran"
    per_flat = {}
    for entry in rec.steps:
        per_flat.setdefault(entry["flat"], []).append(entry["kept"])
    for kept in per_flat.values():  # nothing kept at a partition's first fused step, then always
        assert len(kept) >= 2 and kept == [False] + [True] * (len(kept) - 1), kept
    for i, entry in enumerate(rec.steps):  # (2 ranks: the whole matrices' pass 2 and the others', all-reduces overlapped)
        passes = entry.get("pass2_of", [])  # never a repeat, never a stale kept product
        assert len(passes) == 2 and all(not full and flag == 0.0 for _, full, flag in passes), (i, passes)
    (w_eager, s_eager), (w_fused, s_fused) = runs
    ref_model, ref_opt = reference(steps)
    assert any(r < 1 for r, *_ in s_fused.values()), "the cap never bound"
    assert_close(w_fused, w_eager, rtol=1e-5, atol=1e-6, what=f"ZeRO-{stage} fused vs eager ")
    assert_close(w_fused, dict(ref_model.named_parameters()), rtol=1e-5, atol=1e-6, what=f"ZeRO-{stage} fused vs single ")
    for name, (r, sw, su, c) in s_eager.items():
        r2, sw2, su2, c2 = s_fused[name]
        assert c == c2 and abs(r - r2) <= 1e-5 and abs(sw - sw2) <= 1e-5 * sw + 1e-7 and abs(su - su2) <= 1e-5 * su + 1e-7, \
            (name, s_eager[name], s_fused[name])


def check_refuses(stage, needle, **cfg):
    try:
        engine = make_engine(stage, **cfg)
        train_ds(engine, 1)
    except Exception as err:  # (DeepSpeed's own refusals are ZeRORuntimeException)
        if needle not in str(err):
            raise AssertionError(f"wrong error for {cfg}: {err}") from err
        return
    raise AssertionError(f"no error for {cfg}")


def accelerate_train(accelerator, model, opt, steps):
    rank = dist.get_rank()
    for step in range(steps):
        for micro in range(GAS):
            with accelerator.accumulate(model):
                x, y = batch(step, micro, rank)
                accelerator.backward(loss_fn(model, x, y))
                opt.step()
                opt.zero_grad()


def check_accelerate(stage=2):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(stage)))
    model = make_model()
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95))
    model, opt = accelerator.prepare(model, opt)
    accelerate_train(accelerator, model, opt, 3)
    ref_model, _ = reference(3)
    weyl = unwrap_adamweyl(opt)
    assert weyl is not None and weyl.last_stats is not None and weyl.last_stats.engine == "deepspeed_zero", "AdamWeyl's ZeRO path did not run"
    assert_close(full_weights(model, stage), dict(ref_model.named_parameters()), what="accelerate ZeRO-2 ")


def check_layouts(stage, steps=3, lr=0.05):
    """Parameters of every layout (channels_last, channels_last_3d, transposed, strided slice): under ZeRO with a
    τ that cannot bind, AdamWeyl ends where single-process torch.optim.AdamW does; with the cap binding, where
    single-process AdamWeyl on the same layouts does."""
    rank = dist.get_rank()
    for tau, want in ((1e9, layout_reference("adamw", steps, lr)), (TAU, layout_reference("adamweyl", steps, lr))):
        model = LayoutNet()
        opt = AdamWeyl(layout_groups(model), lr=lr, betas=(0.9, 0.95), tau=tau)
        config = ds_config(stage, train_micro_batch_size_per_gpu=LAYOUT_BATCH // WORLD, gradient_accumulation_steps=1,
                           gradient_clipping=0.0)
        try:
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        except RuntimeError as err:
            # DeepSpeed 0.19 broadcasts every parameter as p.data.view(torch.uint8), which needs a last stride of 1:
            # it refuses transposed, channels_last and strided parameters itself, loudly, before any step. A
            # DeepSpeed that accepts them gets the comparison below.
            assert "stride" in str(err), err
            return
        per = LAYOUT_BATCH // WORLD
        for step in range(steps):
            x, y = layout_batch(step)
            engine.backward(layout_loss(engine, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
            engine.step()
        weyl = unwrap_adamweyl(engine.optimizer)
        assert weyl.last_stats is not None and weyl.last_stats.engine == "deepspeed_zero", "AdamWeyl's ZeRO path did not run"
        if tau == TAU:
            assert float(weyl.last_stats.lr_ratio.min()) < 1, "the cap never bound"
        assert_close(full_weights(engine, stage), want, what=f"ZeRO-{stage} layouts τ={tau} ")


def check_accelerate_offload_swap_refused(stage=2):
    """AdamWeyl built before accelerate learns of a DeepSpeed config with optimizer offload: accelerate replaces it
    by DeepSpeedCPUAdam(adamw_mode=False) built from its param groups; that optimizer's first step is refused and
    no weight has changed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    AcceleratorState._reset_state(True)  # (after accelerate_zero2: a fresh plugin)
    model = make_model()
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = ds_config(stage, zero={"offload_optimizer": {"device": "cpu"}})
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model, opt = accelerator.prepare(model, opt)
    assert unwrap_adamweyl(opt) is None, "accelerate kept AdamWeyl: this check no longer sees the swap"
    try:
        for micro in range(GAS):  # (accelerate's DeepSpeed backward steps the engine at the accumulation boundary)
            x, y = batch(0, micro, dist.get_rank())
            accelerator.backward(loss_fn(model, x, y))
            opt.step()
    except RuntimeError as err:
        assert "refusing the step of deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam" in str(err), str(err)
        assert "offload_optimizer" in str(err), str(err)
    else:
        raise AssertionError("DeepSpeedCPUAdam stepped in place of AdamWeyl")
    after = full_weights(model, stage)
    assert all(torch.equal(before[n], after[n]) for n in before), "weights changed before the refusal"


def check_accelerate_offload(before: bool, keep_line: bool):
    """accelerate with CPU optimizer offload, AdamWeyl built before or after the Accelerator announced the config:
    with ``zero_force_ds_cpu_optimizer: false`` AdamWeyl steps (and ends where one process does); without it, an
    AdamWeyl built after is refused when built (one built before: accelerate_offload_swap_refused)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    AcceleratorState._reset_state(True)
    extra = offload() if keep_line else {"zero": {"offload_optimizer": {"device": "cpu"}}}
    cfg = ds_config(2, **extra)
    model = make_model()
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95)) if before else None
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    if not before:
        try:
            opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95))
        except ValueError as err:
            assert not keep_line and '"zero_force_ds_cpu_optimizer": false' in str(err), err
            return
        assert keep_line, "AdamWeyl was built under an offload config that would swap it"
    model, opt = accelerator.prepare(model, opt)
    accelerate_train(accelerator, model, opt, 3)
    weyl = unwrap_adamweyl(opt)
    assert weyl is not None and weyl.last_stats is not None and weyl.last_stats.engine == "deepspeed_zero"
    ref_model, _ = reference(3)
    assert_close(full_weights(model, 2), dict(ref_model.named_parameters()), what="accelerate ZeRO-2 offload ")


CHECKS = {
    **{f"equal_zero{s}_{m}": (lambda s=s, m=m: check_equal(s, m)) for s in (1, 2, 3) for m in hf_weyl.integrations.deepspeed.SIGMA_MODES},
    **{f"equal_zero{s}_bf16": (lambda s=s: check_equal_bf16(s)) for s in (2, 3)},
    "resume_zero2": lambda: check_resume(2),
    "resume_zero3": lambda: check_resume(3),
    "inf_one_rank_zero2_fp32": lambda: check_inf_one_rank(2, votes=True),
    "inf_one_rank_zero2_fp32_offload": lambda: check_inf_one_rank(2, votes=False, **offload()),
    "inf_one_rank_zero2_bf16_unchecked": lambda: check_inf_one_rank(
        2, ds_skips=False, votes=True, bf16={"enabled": True, "check_grad_overflow": False}, gradient_clipping=0.0
    ),
    "inf_one_rank_zero2_bf16_unchecked_offload": lambda: check_inf_one_rank(
        2, ds_skips=False, votes=True, bf16={"enabled": True, "check_grad_overflow": False}, gradient_clipping=0.0,
        **offload(),
    ),
    "inf_one_rank_zero3_fp32": lambda: check_inf_one_rank(3, votes=False),
    **{f"layouts_zero{s}": (lambda s=s: check_layouts(s)) for s in (1, 2, 3)},
    "refuse_round_robin": lambda: check_refuses(2, "round_robin_gradients", zero={"round_robin_gradients": True}),
    **{f"offload_zero{s}{pin}": (lambda s=s, pin=pin: check_equal(s, "vector_reduce", **offload(pin == "_pinned")))
       for s in (1, 2, 3) for pin in ("", "_pinned")},
    "offload_zero2_gather": lambda: check_equal(2, "gather", **offload()),
    **{f"offload_equals_no_offload_zero{s}": (lambda s=s: check_offload_equals_no_offload(s)) for s in (2, 3)},
    "offload_equals_no_offload_zero2_bf16": lambda: check_offload_equals_no_offload(2, bf16={"enabled": True}),
    **{f"fused_pieces_zero{s}": (lambda s=s: check_fused_pieces(s, **offload())) for s in (2, 3)},
    "fused_pieces_zero2_no_offload": lambda: check_fused_pieces(2),
    "resume_offload_zero2": lambda: check_resume(2, **offload()),
    "resume_offload_zero3": lambda: check_resume(3, **offload(True)),
    "refuse_offload_without_keep_line": lambda: check_refuses(  # DeepSpeed's own refusal of a client optimizer
        2, "zero_force_ds_cpu_optimizer", zero={"offload_optimizer": {"device": "cpu"}}
    ),
    "accelerate_zero2": check_accelerate,  # last: they create accelerate's global state
    "accelerate_offload_swap_refused": check_accelerate_offload_swap_refused,
    "accelerate_offload_before_kept": lambda: check_accelerate_offload(before=True, keep_line=True),
    "accelerate_offload_after_kept": lambda: check_accelerate_offload(before=False, keep_line=True),
    "accelerate_offload_after_refused": lambda: check_accelerate_offload(before=False, keep_line=False),
}


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or list(CHECKS)
    deepspeed.init_distributed(dist_backend="gloo")
    run_checks({n: CHECKS[n] for n in names}, out)

if __name__ == "__main__":
    main()
