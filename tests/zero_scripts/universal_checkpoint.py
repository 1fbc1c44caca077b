"""Change of world size through DeepSpeed's universal checkpoint, with AdamWeyl under ZeRO.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 universal_checkpoint.py save DIR STAGE OUT.json
    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \
        --input_folder DIR/t2 --output_folder DIR/t2_universal
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 universal_checkpoint.py load DIR STAGE OUT.json

``save`` trains 2 steps on 2 ranks and writes a DeepSpeed checkpoint; ``load`` resumes the converted
universal checkpoint on 1 rank and trains 2 more steps. Each writes (rank 0) "ok" or the error to OUT.json.
The expected result is the single-process AdamWeyl whose power-iteration vectors are dropped after
step 2: universal conversion keeps weights, moments and step counts, and AdamWeyl re-initialises
its vectors (cold start) — the documented behaviour across a change of world size. Under ZeRO-3,
DeepSpeed's universal load also copies param group 0's hyperparameters into every group (and one
step tensor into every sub-group's state); the reference mirrors the former, AdamWeyl must warn
about it and must not be fooled by the latter.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import deepspeed
import torch.distributed as dist

from hf_weyl import AdamWeyl, unwrap_adamweyl
from hf_weyl.core.optimizer import GROUP_INDEX, UPDATE_VECTOR, WEIGHT_VECTOR

sys.path.insert(0, os.path.dirname(__file__))
from zero_checks import GAS, LR, MICRO, TAU, WORLD, assert_close, batch, full_weights, groups, loss_fn, make_model, reference  # noqa: E402

GLOBAL_MICRO = WORLD * MICRO  # samples per micro-step over all ranks, kept when the world size changes
TAG = "t2"


def engine_for(stage: int, universal: bool, seed: int = 0):
    world = dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_MICRO // world,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal},
    }
    model = make_model(seed)
    opt = AdamWeyl(groups(model), lr=LR, tau=TAU, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def train(engine, steps: int, first_step: int = 0) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_MICRO // world
    for step in range(first_step, first_step + steps):
        for micro in range(GAS):
            x, y = batch(step, micro)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            engine.backward(loss_fn(engine, x[sl], y[sl]))
            engine.step()


def reference_with_vectors_dropped(steps_before: int, steps_after: int, group0_everywhere: bool = False):
    """Single process; after ``steps_before`` steps the vectors are dropped and, with
    ``group0_everywhere``, every group takes group 0's hyperparameters (DeepSpeed's ZeRO-3 universal load)."""

    def after_conversion(step, opt):
        if step != steps_before:
            return
        for state in opt.state.values():
            state.pop(WEIGHT_VECTOR, None)
            state.pop(UPDATE_VECTOR, None)
        if group0_everywhere:
            for group in opt.param_groups[1:]:
                group.update({k: v for k, v in opt.param_groups[0].items() if k not in ("params", GROUP_INDEX)})

    model, _ = reference(steps_before + steps_after, before_step=after_conversion)
    return model


def save(folder: str, stage: int) -> None:
    engine = engine_for(stage, universal=False)
    train(engine, 2)
    engine.save_checkpoint(folder, tag=TAG)


def load(folder: str, stage: int) -> None:
    assert dist.get_world_size() != WORLD, "the point is a change of world size"
    engine = engine_for(stage, universal=True, seed=123)  # another init: all must come from the checkpoint
    engine.load_checkpoint(folder, tag=f"{TAG}_universal")
    weyl = unwrap_adamweyl(engine.optimizer)
    assert weyl is not None and weyl.state, "AdamWeyl state was not restored"
    steps = [float(s["step"]) for s in weyl.state.values() if "step" in s]
    assert steps and all(s == 2 for s in steps), f"step counters after conversion: {steps}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(engine, 2, first_step=2)
    repaired = [w for w in caught if "param group 0's entries" in str(w.message)]
    # ZeRO-3's universal load copies group 0's hyperparameters into every group: AdamWeyl must say so.
    assert len(repaired) == (1 if stage == 3 else 0), [str(w.message) for w in caught]
    assert weyl.last_stats is not None and weyl.last_stats.engine == "deepspeed_zero", "AdamWeyl's ZeRO path did not run after the universal load"
    want = dict(reference_with_vectors_dropped(2, 2, group0_everywhere=stage == 3).named_parameters())
    assert_close(full_weights(engine, stage), want, what=f"ZeRO-{stage} universal 2→{dist.get_world_size()} ranks ")


def main() -> None:
    mode, folder, stage, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        {"save": save, "load": load}[mode](folder, stage)
        result = "ok"
    except Exception:  # noqa: BLE001 - reported to pytest
        result = traceback.format_exc()
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"result": next((r for r in results if r != "ok"), "ok")}, f)


if __name__ == "__main__":
    main()
