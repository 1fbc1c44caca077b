#!/usr/bin/env python
"""Fine-tune ViT-B/16 (ImageNet-21k checkpoint) on ImageNet-1k with AdamW² and no learning-rate warmup.

Defaults: τ = 0.004, betas 0.9/0.99, weight decay 0.05, cosine decay, no warmup, label smoothing 0.1.
``--from_scratch`` switches to the paper's ViT-B setting (random init, lr 1e-3, 150 epochs, batch 1024,
no grad clipping, RandAugment(2 ops, magnitude 9), mixup 0.8, cutmix 1.0, label smoothing 0.1; the
augmentations need torchvision; transformers' ViT has no stochastic depth, so that one is left out).

    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/finetune_vit_imagenet.py \
        --output_dir vit-b16-in1k-adamw-weyl --hub_token $HF_TOKEN --with_tracking --push_to_hub

``ILSVRC/imagenet-1k`` is gated: accept its terms on the Hub and pass a token. Offline: ``--preset
tiny`` (a small ViT on scikit-learn's digits, written as an imagefolder) uses the same data path.
The baseline: ``--optimizer adamw --warmup_steps N``. ``--tau auto``: τ from the run's total optimizer steps,
``hf_weyl.tau_for_steps`` = clamp(30 / steps, 0.01, 0.03) — hf_weyl's rule, measured on small presets; the paper's
ViT τ is 0.004.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, ViTForImageClassification

from hf_weyl.recipe import hub, presets
from hf_weyl.recipe.cli import add_training_args, check_training_args, make_parser, parse_with_train_length
from hf_weyl.recipe.data import first_rows, image_transform, load_image_datasets, require_rows
from hf_weyl.recipe.errors import loading, user_errors
from hf_weyl.recipe.metrics import load_metric
from hf_weyl.recipe.model_card import CardMetric, diverged_reason, render_model_card, training_hyperparameters
from hf_weyl.recipe.output import reproduce_commands, save_hub_folder
from hf_weyl.recipe.run import Run, prepare_output_dir
from hf_weyl.recipe.tracking import (
    CapLog, TrainLog, check_monitor_supported, monitor_probe, monitor_statistics,
)
from hf_weyl.recipe.training import build_optimizer, build_scheduler, make_accelerator, unwrap_model

RECIPE = "finetune_vit_imagenet"
logger = get_logger(__name__)

#: Defaults of ``--preset tiny`` and ``--from_scratch`` (explicit options still win).
PRESETS = {
    "tiny": dict(per_device_train_batch_size=64, per_device_eval_batch_size=128, gradient_accumulation_steps=1,
                 learning_rate=1e-3, max_train_steps=60, logging_steps=5, eval_steps=30, dataloader_num_workers=0,
                 label_smoothing=0.0),
}
FROM_SCRATCH = dict(learning_rate=1e-3, weight_decay=0.05, max_grad_norm=0.0, num_train_epochs=150, label_smoothing=0.1,
                    randaugment=True, mixup_alpha=0.8, cutmix_alpha=1.0, per_device_train_batch_size=128,
                    gradient_accumulation_steps=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(RECIPE, __doc__.split("\n\n")[0])
    data = parser.add_argument_group("data and model")
    data.add_argument("--preset", choices=sorted(PRESETS), default=None, help="Offline preset (local data, small model).")
    data.add_argument("--dataset_name", type=str, default="ILSVRC/imagenet-1k")
    data.add_argument("--train_dir", type=str, default=None, help="Local imagefolder: <dir>/<class>/<image>.")
    data.add_argument("--validation_dir", type=str, default=None)
    data.add_argument("--model_name_or_path", type=str, default="google/vit-base-patch16-224-in21k")
    data.add_argument("--from_scratch", action="store_true", help="Random init with the paper's ViT training setting.")
    data.add_argument("--dataloader_num_workers", type=int, default=8)
    reg = parser.add_argument_group("augmentation and regularisation")
    reg.add_argument("--label_smoothing", type=float, default=0.1)
    reg.add_argument("--randaugment", action="store_true", help="RandAugment(num_ops=2, magnitude=9) (torchvision).")
    reg.add_argument("--mixup_alpha", type=float, default=0.0, help="MixUp α, 0 = off (torchvision).")
    reg.add_argument("--cutmix_alpha", type=float, default=0.0, help="CutMix α, 0 = off (torchvision).")
    add_training_args(
        parser, learning_rate=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.05, max_grad_norm=1.0, tau=0.004,
        warmup_steps=0, lr_scheduler_type="cosine", per_device_train_batch_size=64, per_device_eval_batch_size=128,
        num_train_epochs=10, eval_steps=1000,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    known = parser.parse_known_args(argv)[0]
    if known.from_scratch:
        parser.set_defaults(**FROM_SCRATCH)
    if known.preset is not None:
        parser.set_defaults(**PRESETS[known.preset], dataset_name=None)
    args = parse_with_train_length(parser, argv)  # --max_train_steps given wins, else --num_train_epochs given
    args.argv = argv
    check_training_args(parser, args)
    if args.train_dir is not None:
        args.dataset_name = None
        if args.preset is not None:
            parser.error("--preset brings its own data; leave out --train_dir")
    for name in ("train_dir", "validation_dir"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            parser.error(f"--{name}: no such directory {path!r}")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.mixup_alpha < 0 or args.cutmix_alpha < 0:
        parser.error(f"--mixup_alpha/--cutmix_alpha must be >= 0, got {args.mixup_alpha}/{args.cutmix_alpha}")
    needs_tv = args.randaugment or args.mixup_alpha > 0 or args.cutmix_alpha > 0
    if needs_tv and importlib.util.find_spec("torchvision") is None:
        parser.error("--randaugment/--mixup_alpha/--cutmix_alpha need torchvision (pip install torchvision)")
    return args


def load_data(args: argparse.Namespace):
    """``image``/``label`` splits with ``set_transform`` → ``pixel_values``/``labels``, and the image processor."""
    if args.preset == "tiny":
        train_dir, validation_dir = presets.tiny_image_dirs(seed=0)
        processor = presets.tiny_image_processor()
    else:
        train_dir, validation_dir = args.train_dir, args.validation_dir
        with loading("--model_name_or_path", args.model_name_or_path):
            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, token=args.hub_token)
    splits = load_image_datasets(dataset_name=args.dataset_name, train_dir=train_dir, validation_dir=validation_dir,
                                 token=args.hub_token)
    augment = None
    if args.randaugment:
        from torchvision.transforms import RandAugment

        augment = RandAugment(num_ops=2, magnitude=9)
    splits["train"].set_transform(image_transform(processor, train=True, augment=augment))
    splits["validation"].set_transform(image_transform(processor, train=False))
    return splits, processor


def make_model(args: argparse.Namespace, labels: list[str]) -> ViTForImageClassification:
    label2id = {name: i for i, name in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if args.preset == "tiny":
        return ViTForImageClassification(presets.tiny_vit_config(len(labels), id2label=id2label, label2id=label2id))
    with loading("--model_name_or_path", args.model_name_or_path):
        if args.from_scratch:
            config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=len(labels), id2label=id2label,
                                                label2id=label2id, token=args.hub_token)
            return ViTForImageClassification(config)
        return ViTForImageClassification.from_pretrained(
            args.model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True, token=args.hub_token,
        )


def make_collate(args: argparse.Namespace, num_labels: int, train: bool):
    """Stack a batch; on training batches optionally MixUp/CutMix (labels become class probabilities)."""
    mix = None
    if train and (args.mixup_alpha > 0 or args.cutmix_alpha > 0):
        from torchvision.transforms import v2

        choices = [v2.MixUp(alpha=args.mixup_alpha, num_classes=num_labels)] if args.mixup_alpha > 0 else []
        choices += [v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_labels)] if args.cutmix_alpha > 0 else []
        mix = v2.RandomChoice(choices)

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([r["pixel_values"] for r in rows])
        labels = torch.stack([torch.as_tensor(r["labels"]) for r in rows])
        if mix is not None:
            pixel_values, labels = mix(pixel_values, labels)
        return {"pixel_values": pixel_values, "labels": labels}

    return collate


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
        splits, processor = load_data(args)
    labels = splits["train"].features["label"].names
    require_rows(splits["train"], args.per_device_train_batch_size * accelerator.num_processes, "the training data",
                 "one batch is --per_device_train_batch_size × processes; give more images or a smaller batch")
    require_rows(splits["validation"], 1, "the validation data", "give validation images")
    eval_dataset = splits["validation"]
    if args.max_eval_batches:  # a shorter evaluation set read to the end: never `break` out of an accelerate loader
        eval_rows = args.max_eval_batches * args.per_device_eval_batch_size * accelerator.num_processes
        eval_dataset = first_rows(eval_dataset, eval_rows)
    # --monitor_steps: a fixed probe batch of validation rows for the attention-entropy measurement
    probe = None
    if args.monitor_steps:
        probe = monitor_probe(eval_dataset, make_collate(args, len(labels), train=False), accelerator.device)
    model = make_model(args, labels)
    train_dataloader = DataLoader(splits["train"], shuffle=True, batch_size=args.per_device_train_batch_size,
                                  collate_fn=make_collate(args, len(labels), train=True), drop_last=True,
                                  num_workers=args.dataloader_num_workers)
    eval_dataloader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size,
                                 collate_fn=make_collate(args, len(labels), train=False),
                                 num_workers=args.dataloader_num_workers)
    if args.max_train_steps is None:
        steps_per_epoch = -(-len(train_dataloader) // (args.gradient_accumulation_steps * accelerator.num_processes))
        args.max_train_steps = args.num_train_epochs * steps_per_epoch

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

    def compute_loss(batch) -> torch.Tensor:
        """Cross-entropy with label smoothing; labels are class ids or (after MixUp/CutMix) probabilities."""
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=args.label_smoothing)

    def evaluate() -> dict[str, float]:
        """Top-1 accuracy through the shipped `accuracy` metric, and the validation loss."""
        model.eval()
        metric = load_metric("accuracy")
        loss_sum, count = 0.0, 0
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(pixel_values=batch["pixel_values"]).logits.float()
            losses, preds, refs = accelerator.gather_for_metrics(
                (F.cross_entropy(logits, batch["labels"], reduction="none"), logits.argmax(-1), batch["labels"])
            )
            loss_sum += float(losses.sum())
            count += losses.numel()
            metric.add_batch(predictions=preds, references=refs)
        model.train()
        return {"eval_loss": loss_sum / count, "accuracy": metric.compute()["accuracy"]}

    # Training: optimizer steps up to --max_train_steps, continuing from log.completed_steps after a resume.
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
                loss = compute_loss(batch)
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

    # The Hub-ready folder: weights, image processor, results, log, plots and the model card.
    results = {"accuracy": log.last("accuracy"), "eval_loss": log.last("eval_loss"), "step": log.completed_steps,
               "train_loss": log.last("train_loss"), "optimizer": args.optimizer, "warmup_steps": args.warmup_steps,
               "tau": args.tau if args.optimizer == "adamw_weyl" else None,
               "tau_auto_steps": getattr(args, "tau_auto_steps", None)}
    dataset_id = "sklearn-digits" if args.preset == "tiny" else (args.dataset_name or "local-imagefolder")
    base_model = None if (args.preset or args.from_scratch) else args.model_name_or_path
    model_name = f"{'tiny-' if args.preset else ''}vit-{dataset_id.split('/')[-1]}-{args.optimizer}"
    how = "trained from scratch" if base_model is None else f"fine-tuned from `{base_model}`"
    config = unwrap_model(accelerator, model).config
    metrics = [CardMetric("accuracy", "top-1 accuracy", results["accuracy"]),
               CardMetric("loss", "validation loss", results["eval_loss"])]

    def card(plots):
        return render_model_card(
            model_name=model_name,
            summary=(f"A ViT ({config.num_hidden_layers} layers, width {config.hidden_size}, patch "
                     f"{config.patch_size}, {config.image_size}px) {how} on `{dataset_id}` "
                     f"({len(labels)} classes) for {log.completed_steps} optimizer steps."),
            task_type="image-classification", task_name="Image classification", dataset_id=dataset_id,
            dataset_name=dataset_id, pipeline_tag="image-classification", tags=["vit"], base_model=base_model,
            metrics=metrics,
            hyperparameters={**training_hyperparameters(args, accelerator.num_processes, changes=log.changes()),
                             "label smoothing": args.label_smoothing, "RandAugment": args.randaugment,
                             "mixup α": args.mixup_alpha, "cutmix α": args.cutmix_alpha},
            plots=plots, reproduce_command=reproduce_commands(f"recipes/{RECIPE}.py", log, args.output_dir),
            optimizer=args.optimizer, warmup_steps=args.warmup_steps,
        )

    save_hub_folder(accelerator, model, processor, args, log, results, card)
    accelerator.print(f"Top-1 accuracy {results['accuracy']:.4f}; Hub-ready folder: {args.output_dir}")
    if diverged_reason(metrics):  # the card says so and reports no results; --push_to_hub refuses it
        accelerator.print(f"warning: training {diverged_reason(metrics)}; the card reports no results")
    hub.push_run(accelerator, args, results)  # a diverged run (NaN or inf results) is refused, its folder kept
    return results


if __name__ == "__main__":
    main()
