"""Overhead of the training monitor at its default interval on the tiny GPT-2 preset.

One run trains the tiny GPT-2 with AdamWeyl and calls the monitor (``collect_metrics`` with a
4-example probe batch, exactly what ``WeylMonitorCallback`` does) every ``--interval`` steps.
Training-step time and monitor time are measured side by side in the same run, so machine noise
hits both; the ratio monitor / training is the overhead.

    python benchmarks/monitor_overhead.py --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hf_weyl
from hf_weyl.recipe import presets
from hf_weyl.monitor import DEFAULT_INTERVAL, collect_metrics


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--interval", type=int, default=DEFAULT_INTERVAL)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.interval < 1 or args.batch_size < 1:
        p.error("--steps, --interval and --batch_size must be >= 1")
    torch.set_num_threads(args.threads)
    splits, tok = presets.tiny_text_splits(block_size=64)
    train = torch.tensor(splits["train"]["input_ids"])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(presets.tiny_gpt2_config(len(tok)))
    opt = hf_weyl.AdamWeyl(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, tau=0.01)
    probe = {"input_ids": train[:4], "labels": train[:4]}
    gen = torch.Generator().manual_seed(0)
    t_train = t_monitor = 0.0
    calls = 0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch_size,), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=train[idx], labels=train[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        t_train += t1 - t0
        if step == 1 or step % args.interval == 0:  # as WeylMonitorCallback
            collect_metrics(model, probe, opt)
            t_monitor += time.perf_counter() - t1
            calls += 1
    ratio = t_monitor / t_train
    print(f"tiny GPT-2 preset (2 layers, 128 wide, batch {args.batch_size}x64 tokens), AdamWeyl, {args.steps} steps, "
          f"torch threads {args.threads}")
    print(f"training {t_train:.2f} s ({1000 * t_train / args.steps:.1f} ms/step); monitor {t_monitor:.2f} s over {calls} calls "
          f"({1000 * t_monitor / calls:.1f} ms/call, every {args.interval} steps)")
    print(f"monitor overhead = monitor / training time = {100 * ratio:.2f}%  (target <= 2%)")
    return ratio


if __name__ == "__main__":
    main()
