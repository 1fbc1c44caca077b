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
The baseline: ``--optimizer adamw --warmup_steps 2000``. ``--tau auto``: τ from the run's total optimizer
steps, ``hf_weyl.tau_for_steps`` = clamp(30 / steps, 0.01, 0.03) (0.03 for the preset's 300 steps).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_weyl.recipe import hub, presets
from hf_weyl.recipe.cli import TAU_AUTO, add_training_args, check_training_args, make_parser, parse_with_train_length
from hf_weyl.recipe.data import first_rows, load_text_datasets, pack_text, require_rows
from hf_weyl.recipe.errors import loading, user_errors
from hf_weyl.recipe.metrics import load_metric
from hf_weyl.recipe.model_card import CardMetric, diverged_reason, render_model_card, training_hyperparameters
from hf_weyl.recipe.output import reproduce_commands, save_hub_folder
from hf_weyl.recipe.run import Run, prepare_output_dir
from hf_weyl.recipe.tracking import (
    CapLog, TrainLog, check_monitor_supported, monitor_probe, monitor_statistics,
)
from hf_weyl.recipe.training import build_optimizer, build_scheduler, make_accelerator, unwrap_model

RECIPE = "pretrain_gpt2_openwebtext"
logger = get_logger(__name__)

#: Defaults of ``--preset tiny`` (explicit options still win): runs in about two minutes on 2 CPU cores.
PRESETS = {
    "tiny": dict(block_size=64, per_device_train_batch_size=16, per_device_eval_batch_size=32, gradient_accumulation_steps=1,
                 learning_rate=6e-4, max_train_steps=300, logging_steps=5, eval_steps=50, max_eval_batches=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(RECIPE, __doc__.split("\n\n")[0])
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
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset], dataset_name=None)
    args = parse_with_train_length(parser, argv)  # --max_train_steps given wins, else --num_train_epochs given
    args.argv = argv
    check_training_args(parser, args)
    if args.max_train_steps is None and args.streaming:
        if args.tau == TAU_AUTO and args.optimizer == "adamw_weyl":
            parser.error(f"--tau {TAU_AUTO} takes τ from the run's total optimizer steps, but a streamed dataset has no "
                         f"length, so --num_train_epochs {args.num_train_epochs} cannot be counted in steps; give "
                         "--max_train_steps (or a number for --tau)")
        parser.error(f"--num_train_epochs {args.num_train_epochs}: a streamed dataset has no length, so epochs cannot "
                     "be counted in steps; give --max_train_steps")
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
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must be in (0, 100), got {args.validation_split_percentage}")
    if args.preprocessing_num_workers is not None and args.preprocessing_num_workers < 1:
        parser.error(f"--preprocessing_num_workers must be >= 1 (or left out), got {args.preprocessing_num_workers}")
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
        with loading("--tokenizer_name", args.tokenizer_name):
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
        with loading("--config_name", args.config_name):
            base = GPT2Config.from_pretrained(args.config_name) if args.config_name else GPT2Config()
        config = GPT2Config.from_dict({**base.to_dict(), "vocab_size": len(tokenizer), "n_positions": args.block_size,
                                       "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                                       "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    model = GPT2LMHeadModel(config)
    # transformers derives the loss from the class name, finds none in "GPT2LMHeadModel", warns once ("loss_type=None
    # ... unrecognized") and uses the causal-LM loss: name that loss, which is what it computes anyway.
    model.loss_type = "ForCausalLM"
    return model


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids}


@user_errors(f"{RECIPE}.py")  # bad options, data or checkpoints: one line, exit code 2 (other errors keep their traceback)
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)  # created and writable before anything else runs
    accelerator = make_accelerator(args)
    logger.info(accelerator.state, main_process_only=False)
    if args.monitor_steps:
        check_monitor_supported(accelerator)
    run = Run.start(accelerator, args)  # the checkpoint to resume from: complete, this recipe, the same options
    hub.prepare_push(accelerator, args)  # --push_to_hub: the repository exists now, not after training
    set_seed(args.seed)

    with accelerator.main_process_first():
        splits, tokenizer = load_data(args)
    batch = args.per_device_train_batch_size * accelerator.num_processes
    require_rows(splits["train"], batch, f"the training data, in {args.block_size}-token blocks,",
                 "one batch is --per_device_train_batch_size × processes; give more text or a smaller --block_size")
    require_rows(splits["validation"], 1, f"the validation data, in {args.block_size}-token blocks,",
                 "give more validation text or a smaller --block_size")
    eval_dataset = splits["validation"]
    if args.max_eval_batches:  # a shorter evaluation set read to the end: never `break` out of an accelerate loader
        eval_rows = args.max_eval_batches * args.per_device_eval_batch_size * accelerator.num_processes
        eval_dataset = first_rows(eval_dataset, eval_rows)
    # --monitor_steps: a fixed probe batch of validation rows for the attention-entropy measurement
    probe = monitor_probe(eval_dataset, collate, accelerator.device) if args.monitor_steps else None
    model = make_model(args, tokenizer)
    train_dataloader = DataLoader(splits["train"], shuffle=not args.streaming, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size, drop_last=True)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collate, batch_size=args.per_device_eval_batch_size)
    if args.max_train_steps is None:  # --num_train_epochs without --max_train_steps: epochs × steps per epoch
        # per process, accelerate's sharded loader has len // processes batches (drop_last); the epoch's end syncs
        batches_per_process = len(train_dataloader) // accelerator.num_processes
        args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)

    run.resolve_tau(accelerator, args)  # --tau auto: τ from the run's total optimizer steps, before the first step
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, accelerator.num_processes)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    log = TrainLog(args.argv)  # step counter and history, saved in every checkpoint
    cap = CapLog(optimizer)  # the AdamW² cap's statistics over each logging interval, on the device until logged
    accelerator.register_for_checkpointing(log)
    if run.checkpoint is not None:
        run.resume(accelerator, model, optimizer, scheduler, log)

    def evaluate() -> dict[str, float]:
        """Validation loss (mean token cross-entropy) and perplexity through the shipped `perplexity` metric."""
        model.eval()
        metric = load_metric("perplexity")
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
            metric.add_batch(losses=accelerator.gather_for_metrics(losses.view(labels.shape).mean(1)))
        result = metric.compute()
        model.train()
        return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}

    # Training: optimizer steps up to --max_train_steps, continuing from log.completed_steps after a resume.
    # A streamed dataset has no length: it is read as one epoch.
    if args.streaming:
        steps_per_epoch = args.max_train_steps
    else:
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    start_epoch, steps_into_epoch = divmod(log.completed_steps, steps_per_epoch)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if log.completed_steps >= args.max_train_steps:
        accelerator.print(f"{run.checkpoint} is step {log.completed_steps} of --max_train_steps {args.max_train_steps}: "
                          "nothing to train; writing the output folder from it")
    progress = tqdm(range(args.max_train_steps), initial=log.completed_steps, disable=not accelerator.is_local_main_process,
                    desc=f"training ({args.optimizer})")
    loss_sum, loss_count, grad_norm = torch.zeros((), device=accelerator.device), 0, None
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if log.completed_steps >= args.max_train_steps:
            break
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == start_epoch and steps_into_epoch:  # resume inside an epoch: the same batches as without the stop
            batches = accelerator.skip_first_batches(train_dataloader, steps_into_epoch * args.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                loss_sum += loss.detach().float()
                loss_count += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:  # accumulating: no optimizer step yet
                continue
            cap.update()
            log.completed_steps += 1
            step = log.completed_steps
            progress.update(1)
            last = step == args.max_train_steps
            save_now = args.checkpointing_steps is not None and (step % args.checkpointing_steps == 0 or last)

            if step % args.logging_steps == 0 or last or save_now:  # a checkpoint ends a logging interval (exact resume)
                lr = scheduler.get_last_lr()[0]
                values = {"train_loss": accelerator.reduce(loss_sum / loss_count, reduction="mean").item(), "lr": lr,
                          "epoch": epoch, **cap.read(lr)}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                loss_sum.zero_()
                loss_count = 0
                log.record(values)
                progress.set_postfix(loss=f"{values['train_loss']:.3f}", lr=f"{lr:.2e}")
                if args.with_tracking:
                    accelerator.log(values, step=step)
            if args.monitor_steps and (step % args.monitor_steps == 0 or step == 1 or last):
                values = monitor_statistics(unwrap_model(accelerator, model), probe)
                log.record(values)
                if args.with_tracking:
                    accelerator.log(values, step=step)
            if step % args.eval_steps == 0 or last:
                results = evaluate()
                log.record(results)
                logger.info(f"step {step}: " + ", ".join(f"{k} = {v:.4g}" for k, v in results.items()))
                if args.with_tracking:
                    accelerator.log(results, step=step)
            if save_now:
                run.save_checkpoint(accelerator, step, model)
            if last:
                break
    progress.close()
    if args.with_tracking:
        accelerator.end_training()

    # The Hub-ready folder: weights, tokenizer, results, log, plots and the model card.
    results = {"eval_loss": log.last("eval_loss"), "perplexity": log.last("perplexity"),
               "train_loss": log.last("train_loss"), "step": log.completed_steps, "optimizer": args.optimizer,
               "warmup_steps": args.warmup_steps, "tau": args.tau if args.optimizer == "adamw_weyl" else None,
               "tau_auto_steps": getattr(args, "tau_auto_steps", None)}
    dataset_id = "python-stdlib-sources" if args.preset == "tiny" else (args.dataset_name or "local-text")
    model_name = f"{'tiny-' if args.preset else ''}gpt2-{dataset_id.split('/')[-1]}-{args.optimizer}"
    config = unwrap_model(accelerator, model).config
    metrics = [CardMetric("loss", "validation loss", results["eval_loss"]),
               CardMetric("perplexity", "validation perplexity", results["perplexity"])]

    def card(plots):
        return render_model_card(
            model_name=model_name,
            summary=(f"A GPT-2 ({config.n_layer} layers, width {config.n_embd}, "
                     f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) trained from scratch on "
                     f"`{dataset_id}` with {args.block_size}-token packed blocks, "
                     f"for {log.completed_steps} optimizer steps."),
            task_type="text-generation", task_name="Causal language modeling", dataset_id=dataset_id,
            dataset_name=dataset_id, pipeline_tag="text-generation", tags=["gpt2"],
            metrics=metrics,
            hyperparameters=training_hyperparameters(args, accelerator.num_processes, tokens_per_example=args.block_size,
                                                     changes=log.changes()),
            plots=plots, reproduce_command=reproduce_commands(f"recipes/{RECIPE}.py", log, args.output_dir),
            optimizer=args.optimizer, warmup_steps=args.warmup_steps,
        )

    save_hub_folder(accelerator, model, tokenizer, args, log, results, card)
    accelerator.print(f"Validation loss {results['eval_loss']:.4f}, perplexity {results['perplexity']:.2f}; "
                      f"Hub-ready folder: {args.output_dir}")
    if diverged_reason(metrics):  # the card says so and reports no results; --push_to_hub refuses it
        accelerator.print(f"warning: training {diverged_reason(metrics)}; the card reports no results")
    hub.push_run(accelerator, args, results)  # a diverged run (NaN or inf results) is refused, its folder kept
    return results


if __name__ == "__main__":
    main()
