"""σ traffic of AdamWeyl under tensor parallelism × FSDP2, next to FSDP2's own traffic.

    python benchmarks/tp_comm.py                                                  # the 1B-Llama table only
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/tp_comm.py           # + measured on a 2×2 CPU mesh

1. Bytes per optimizer step and rank that the σ collectives hand over, from a 1B-shaped Llama's shapes (hidden
   2048, 16 layers, intermediate 5504, vocab 32000, 16 heads, untied embeddings: built on the meta device,
   nothing downloaded), TP plan as torchtitan's (q/k/v/gate/up colwise, o/down rowwise, embedding rowwise,
   lm_head colwise), at 8 ranks (dp × tp = 4 × 2 and 2 × 4) and 64 ranks (8 × 8), by
   ``hf_weyl.distributed.tp_comm_bytes_per_step``; next to FSDP2's own traffic (all-gather of the parameters in
   forward and again in backward, reduce-scatter of the gradients, each over the dp group on the 1/tp of the
   parameters a TP rank holds: 3 (dp − 1)/dp · N/tp · bytes). TP's own activation all-reduces / all-gathers are
   the model's forward/backward traffic, not the optimizer's, and scale with tokens, not parameters: not counted.
2. With 4 ranks: the formula against the bytes a 2×2 ("dp", "tp") CPU run hands to its σ collectives
   (``hf_weyl.distributed.COMM_STATS``) in one warm step, on a tiny Llama (also asserted in
   tests/test_tensor_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from hf_weyl import AdamWeyl
from hf_weyl.core.functional import FRESH_STEPS
from hf_weyl.core.optimizer import DEFAULT_COLD_START_ITERS
from hf_weyl.distributed import COMM_STATS, SIGMA_MODES, tp_comm_bytes_per_step

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")  # dim-0 TP shards
ROWWISE = ("o_proj", "down_proj")  # dim-1 TP shards


def mib(x):
    return f"{x / 2**20:.2f} MiB"


def llama_1b_config():
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)


def tp_shapes(model):
    """(colwise, rowwise, other) shapes of the ≥2-D parameters (the capped ones), by the TP plan."""
    col, row, other = [], [], []
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        kind = name.split(".")[-2]
        (col if kind in COLWISE else row if kind in ROWWISE else other).append(tuple(p.shape))
    return col, row, other


def fsdp2_traffic(dp, tp, n):
    """FSDP2 over dp ranks on a TP rank's 1/tp of the parameters, bf16 and fp32 parameters."""
    return {f"{name} params": 3 * (dp - 1) / dp * n / tp * b for name, b in (("bf16", 2), ("fp32", 4))}


def llama_table():
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_1b_config())
    n = sum(p.numel() for p in model.parameters())
    col, row, other = tp_shapes(model)
    assert not other, other
    print(f"\n## 1B-shaped Llama ({n / 1e9:.2f}B parameters, {len(col) + len(row)} capped matrices: {len(col)} dim-0 "
          f"TP shards, {len(row)} dim-1), TP × FSDP2, bytes per rank per step")
    print("| ranks (dp × tp) | σ mode | payload | on the wire (ring) | collectives | vs FSDP2's own traffic on the wire "
          "(bf16 params / fp32 params) |")
    print("|---|---|---|---|---|---|")
    cold = DEFAULT_COLD_START_ITERS
    for dp, tp in ((4, 2), (2, 4), (8, 8)):
        base = fsdp2_traffic(dp, tp, n)
        for mode in SIGMA_MODES:
            for iters, label in ((1, "warm, 1 iter"), (cold, f"cold start, {cold} iters")):
                if mode == "gather" and iters > 1:
                    continue
                p = tp_comm_bytes_per_step(col, row, dp=dp, tp=tp, mode=mode, power_iters=iters)
                versus = " / ".join(f"{p['wire'] / b:.2%} of {mib(b)}" for b in base.values())
                print(f"| {dp * tp} ({dp} × {tp}) | {mode} ({label}) | {mib(p['payload'])} | {mib(p['wire'])} | "
                      f"{int(p['collectives'])} | {versus} |")


def measured(mode):
    """One warm step's σ bytes on a 2×2 mesh (tiny Llama) against the formula."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(cfg.num_hidden_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = AdamWeyl([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-3,
                   tau=0.01, sigma_mode=mode)
    for step in range(FRESH_STEPS + 1):
        if step == FRESH_STEPS:
            COMM_STATS.reset()
        ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    col, row, _ = tp_shapes(model)
    got = torch.tensor([float(COMM_STATS.bytes)])
    dist.all_reduce(got)
    return got.item() / dist.get_world_size(), tp_comm_bytes_per_step(col, row, dp=2, tp=2, mode=mode), COMM_STATS.calls


def main():
    distributed = "RANK" in __import__("os").environ
    if not distributed or int(__import__("os").environ["RANK"]) == 0:
        llama_table()
    if not distributed:
        return
    dist.init_process_group("gloo")
    if dist.get_world_size() == 4:
        rows = [(mode, *measured(mode)) for mode in SIGMA_MODES]
        if dist.get_rank() == 0:
            print("\n## Measured on a 2×2 (dp × tp) CPU mesh, tiny Llama (hidden 32, 2 layers, vocab 97), one warm step")
            print("| σ mode | measured payload/rank/step | predicted | collectives/step (measured / predicted) |")
            print("|---|---|---|---|")
            for mode, got, want, calls in rows:
                print(f"| {mode} | {got:,.0f} B | {want['payload']:,.0f} B | {calls} / {int(want['collectives'])} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
