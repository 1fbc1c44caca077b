#!/usr/bin/env python
"""Pretrain GPT-2 small (124M) from scratch on OpenWebText with AdamW² and no learning-rate warmup.

Defaults follow the paper's GPT setting (lr 6e-4, betas 0.9/0.95, weight decay 0.1, grad clip 1.0,
τ = 0.01, cosine decay, no warmup, 12 × 1024 tokens × 40 accumulation ≈ 0.5M tokens per step on one
process — divide --gradient_accumulation_steps by the number of processes). bf16 comes from the
accelerate config (recipes/configs/*.yaml).

    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/pretrain_gpt2_openwebtext.py \
        --output_dir gpt2-owt-adamw-weyl --gradient_accumulation_steps 5 --with_tracking --push_to_hub

Offline, on a laptop: ``--preset tiny`` (a 2-layer GPT-2 on the Python standard library's sources,
with a byte-level BPE tokenizer trained on them) goes through the same data path on local files.
The baseline: ``--optimizer adamw --warmup_steps 2000``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_weyl.recipe import hub, presets
from hf_weyl.recipe.data import load_text_datasets, pack_text
from hf_weyl.recipe.metrics import load_metric
from hf_weyl.recipe.model_card import CardMetric, render_model_card, training_hyperparameters
from hf_weyl.recipe.training import (
    add_training_args, check_training_args, make_accelerator, prepare_training, reproduce_command,
    save_hub_folder, script_argv, train,
)

logger = get_logger(__name__)

#: Defaults of ``--preset tiny`` (explicit options still win): runs in about two minutes on 2 CPU cores.
PRESETS = {
    "tiny": dict(block_size=64, per_device_train_batch_size=16, per_device_eval_batch_size=32, gradient_accumulation_steps=1,
                 learning_rate=6e-4, max_train_steps=300, logging_steps=5, eval_steps=50, max_eval_batches=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data and model")
    data.add_argument("--preset", choices=sorted(PRESETS), default=None, help="Offline preset (local data, small model).")
    data.add_argument("--dataset_name", type=str, default="Skylion007/openwebtext")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_file", type=str, default=None, help="Local .jsonl/.json/.csv (one document per row) or .txt.")
    data.add_argument("--validation_file", type=str, default=None)
    data.add_argument("--validation_split_percentage", type=float, default=0.5,
                      help="Held out from train when the dataset has no validation split (rows when streaming: ×100).")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    data.add_argument("--preprocessing_num_workers", type=int, default=None)
    data.add_argument("--tokenizer_name", type=str, default="openai-community/gpt2")
    data.add_argument("--config_name", type=str, default=None, help="A GPT-2 config to start from (default: GPT-2 small).")
    data.add_argument("--block_size", type=int, default=1024)
    add_training_args(
        parser, learning_rate=6e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, tau=0.01,
        warmup_steps=0, lr_scheduler_type="cosine", per_device_train_batch_size=12, per_device_eval_batch_size=12,
        gradient_accumulation_steps=40, max_train_steps=600_000, eval_steps=2000, max_eval_batches=200,
    )
    argv = script_argv(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset], dataset_name=None)
    args = parser.parse_args(argv)
    args.argv = argv
    check_training_args(parser, args)
    if args.train_file is not None:
        args.dataset_name = None
        if args.preset is not None:
            parser.error("--preset brings its own data; leave out --train_file")
    for name in ("train_file", "validation_file"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name}: no such file {path!r}")
    if args.block_size < 2:
        parser.error(f"--block_size must be >= 2, got {args.block_size}")
    if args.streaming and args.preset is not None:
        parser.error("--streaming is for Hub datasets; --preset tiny reads local files")
    return args


def load_data(args: argparse.Namespace):
    """Packed ``input_ids`` blocks and the tokenizer (the preset writes local files and trains its own)."""
    if args.preset == "tiny":
        train_file, validation_file = presets.tiny_text_files(seed=0)
        tokenizer = presets.tiny_text_tokenizer(train_file)
    else:
        train_file, validation_file = args.train_file, args.validation_file
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    raw = load_text_datasets(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_file=train_file,
        validation_file=validation_file, validation_split_percentage=args.validation_split_percentage,
        streaming=args.streaming,
    )
    return pack_text(raw, tokenizer, args.block_size, num_proc=args.preprocessing_num_workers), tokenizer


def make_model(args: argparse.Namespace, tokenizer) -> GPT2LMHeadModel:
    """GPT-2 from scratch (no dropout, as in the paper's runs); small under --preset tiny."""
    if args.preset == "tiny":
        config = presets.tiny_gpt2_config(len(tokenizer), n_positions=args.block_size, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id)
    else:
        base = GPT2Config.from_pretrained(args.config_name) if args.config_name else GPT2Config()
        config = GPT2Config.from_dict({**base.to_dict(), "vocab_size": len(tokenizer), "n_positions": args.block_size,
                                       "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                       "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    return GPT2LMHeadModel(config)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    accelerator = make_accelerator(args, project_name="pretrain_gpt2_openwebtext")
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)

    with accelerator.main_process_first():
        splits, tokenizer = load_data(args)
    model = make_model(args, tokenizer)
    shuffle = not args.streaming
    train_dataloader = DataLoader(splits["train"], shuffle=shuffle, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size, drop_last=True)
    eval_dataloader = DataLoader(splits["validation"], collate_fn=collate, batch_size=args.per_device_eval_batch_size)

    model, optimizer, train_dataloader, eval_dataloader, scheduler, log = prepare_training(
        accelerator, model, train_dataloader, eval_dataloader, args
    )

    def evaluate() -> dict[str, float]:
        """Validation loss (mean token cross-entropy) and perplexity through the shipped `perplexity` metric."""
        model.eval()
        metric = load_metric("perplexity")
        for i, batch in enumerate(eval_dataloader):
            if args.max_eval_batches and i >= args.max_eval_batches:
                break
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
            metric.add_batch(losses=accelerator.gather_for_metrics(losses.view(labels.shape).mean(1)))
        result = metric.compute()
        return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}

    train(accelerator, model, optimizer, scheduler, train_dataloader, args, log, evaluate, logger)

    last_eval = next(r for r in reversed(log.history) if "eval_loss" in r)
    results = {"eval_loss": last_eval["eval_loss"], "perplexity": last_eval["perplexity"],
               "train_loss": next(r["train_loss"] for r in reversed(log.history) if "train_loss" in r),
               "step": log.completed_steps, "optimizer": args.optimizer, "warmup_steps": args.warmup_steps}
    if args.with_tracking:
        accelerator.end_training()

    dataset_id = "python-stdlib-sources" if args.preset == "tiny" else (args.dataset_name or "local-text")
    model_name = f"{'tiny-' if args.preset else ''}gpt2-{dataset_id.split('/')[-1]}-{args.optimizer}"

    config = accelerator.unwrap_model(model).config

    def card(plots):
        return render_model_card(
            model_name=model_name,
            summary=(f"A GPT-2 ({config.n_layer} layers, width {config.n_embd}, "
                     f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) trained from scratch on "
                     f"`{dataset_id}` with {args.block_size}-token packed blocks, for {log.completed_steps} optimizer steps."),
            task_type="text-generation", task_name="Causal language modeling", dataset_id=dataset_id,
            dataset_name=dataset_id, pipeline_tag="text-generation", tags=["gpt2"],
            metrics=[CardMetric("loss", "validation loss", results["eval_loss"]),
                     CardMetric("perplexity", "validation perplexity", results["perplexity"])],
            hyperparameters=training_hyperparameters(args, accelerator.num_processes, tokens_per_example=args.block_size),
            plots=plots, reproduce_command=reproduce_command("recipes/pretrain_gpt2_openwebtext.py", args.argv),
            optimizer=args.optimizer, warmup_steps=args.warmup_steps,
        )

    save_hub_folder(accelerator, model, tokenizer, args, log, results, card)
    accelerator.print(f"Validation loss {results['eval_loss']:.4f}, perplexity {results['perplexity']:.2f}; "
                      f"Hub-ready folder: {args.output_dir}")
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or __import__("pathlib").Path(args.output_dir).resolve().name
        url = hub.push_folder(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        accelerator.print(f"Pushed to {url}")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
