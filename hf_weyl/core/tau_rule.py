"""A τ for a given run length — hf_weyl's rule, measured on small presets, not the paper's.

τ bounds the relative change of σ1(W) per step, so while the cap binds it sets the pace of the early phase
(σ1 grows at most ×(1+τ) per step) — the paper's τ = 0.01 (GPT) was chosen for 100K–600K-step runs. On the
tiny GPT-2 and ViT presets (``benchmarks/tau_map.py``, docs/benchmarks.md "τ by run length") the τ that
matches best-tuned AdamW with warmup shrinks with the number of steps T; the rule

    τ(T) = clamp(C / T, τ_min, τ_max),   C = 30,  τ_min = 0.01 (the paper's GPT value),  τ_max = 0.03

was within 0.02 nats / 0.5 accuracy points of (or better than) AdamW + warmup at its best rate everywhere it
was measured (GPT 150–2400 steps, ViT 300–1200) at the best rate; it is not a law. ViT runs shorter than ~300
steps were not matched by any τ, and a larger τ gives up part of the protection at high rates (Post-LN BERT,
1200 steps: τ 0.025 collapsed at lr 1e-2 where the paper's 0.01 trained through).
"""

from __future__ import annotations

__all__ = ["TAU_RULE", "tau_for_steps"]

#: (C, τ_min, τ_max) of :func:`tau_for_steps`.
TAU_RULE = (30.0, 0.01, 0.03)


def tau_for_steps(num_training_steps: int) -> float:
    """τ = clamp(30 / T, 0.01, 0.03) for a run of T optimizer steps (see the module docstring for its evidence)."""
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(f"num_training_steps must be an integer >= 1 (optimizer steps of the run), got {num_training_steps!r}")
    c, low, high = TAU_RULE
    return min(high, max(low, c / num_training_steps))
