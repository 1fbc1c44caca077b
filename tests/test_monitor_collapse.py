"""The collapse warning on real runs: tiny GPT-2 preset, AdamW at lr 3e-2 without warmup shows the malignant
signature (block-0 entropy → ~0, σ1(W_qᵀW_k) ×100, SEC(1) → 1) and is flagged; AdamWeyl (τ = 0.01) at the
same lr keeps its entropy and is not. (At this scale the flagged run does not diverge: see docs/benchmarks_warmup_free.md.)"""

import warnings

import pytest
import torch
import transformers

import hf_weyl
from hf_weyl.recipe import presets
from hf_weyl.monitor import CollapseDetector, collect_metrics

STEPS, INTERVAL, LR = 40, 5, 3e-2


@pytest.fixture(scope="module")
def tokens():
    splits, tok = presets.tiny_text_splits(block_size=64)
    return torch.tensor(splits["train"]["input_ids"][:512]), len(tok)


def train(tokens, make_opt):
    data, vocab = tokens
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(presets.tiny_gpt2_config(vocab))
    opt = make_opt(model.parameters())
    probe = {"input_ids": data[:4], "labels": data[:4]}
    gen = torch.Generator().manual_seed(0)
    det = CollapseDetector()
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(data), (8,), generator=gen)
        model(input_ids=data[idx], labels=data[idx]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step == 1 or step % INTERVAL == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                det.update(collect_metrics(model, probe, opt), step)
    return det


def test_adamw_without_warmup_collapses_and_is_flagged(tokens):
    det = train(tokens, lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.9, 0.95), weight_decay=0.1))
    assert det.collapsed, "AdamW at lr 3e-2 without warmup should collapse on the tiny GPT-2 preset"
    a = det.alerts[0]
    assert a.step <= STEPS and a.entropy < 0.5 * a.entropy_start and a.sec >= 0.8


def test_adamweyl_same_lr_is_not_flagged(tokens):
    det = train(tokens, lambda p: hf_weyl.AdamWeyl(p, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, tau=0.01))
    assert not det.collapsed, [a.message() for a in det.alerts]


@pytest.mark.distributed
def test_stop_on_collapse_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 0 alone measures; the stop decision is reduced across ranks (all_reduce MAX). Before, rank 1 went on
    training alone into a DDP all-reduce nobody answered (hang, or a gloo error when rank 0 exited)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "monitor_scripts" / "stop_on_collapse.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        _, stderr = proc.communicate()
        pytest.fail(f"the 2-rank run hung: the ranks did not stop together\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [2, 2]  # FLAG_STEP in the script, well before max_steps
