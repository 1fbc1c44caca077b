"""Upload a recipe's output folder to the Hugging Face Hub (create the repo, upload, return the URL).

The endpoint is ``HF_ENDPOINT`` (default https://huggingface.co): the real Hub needs network access
and a write token (``--hub_token``, ``HF_TOKEN`` or ``hf auth login``). :func:`create_repo` runs at
start-up (as in transformers' ``run_*_no_trainer.py``), so a missing token, a bad repository name or
no network stops the script before training, not after it. A run whose results are not finite (NaN or
±inf: it diverged) is not uploaded (:func:`non_finite_results`): its folder stays on disk, the push is
refused in one line.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["PUSH_IGNORE", "create_repo", "non_finite_results", "prepare_push", "push_folder", "push_run", "repo_id_of"]

#: Not uploaded: resumable training state (large, not needed to use the model) and temp files.
PUSH_IGNORE = ["checkpoints/**", ".tmp_*", "**/.tmp_*", "*.tmp"]


def non_finite_results(results: Mapping[str, Any]) -> list[str]:
    """``"eval_loss is nan"`` for each number of ``results`` (``all_results.json``) that is NaN or ±inf."""
    return [f"{k} is {v}" for k, v in results.items()
            if isinstance(v, float) and not math.isfinite(v)]


def _refuse_non_finite(folder: Path, results: Mapping[str, Any]) -> None:
    bad = non_finite_results(results)
    if bad:
        raise UserError(f"--push_to_hub: not pushing {str(folder)!r}: training diverged ({', '.join(bad)}), and a Hub "
                        "repository must not report that as a result; the folder is kept as it is (its model card "
                        "says diverged); train again, e.g. from an earlier checkpoint with a lower --learning_rate")


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model trained with hf_weyl (AdamW², no warmup)",
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` except :data:`PUSH_IGNORE`; returns the repo URL.
    A :class:`UserError` when its ``all_results.json`` holds a NaN or infinite number (a diverged run)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no README.md (model card); is it a finished recipe output folder?")
    results_file = folder / "all_results.json"
    if results_file.is_file():  # a diverged run's folder is not uploaded (see push_run)
        _refuse_non_finite(folder, json.loads(results_file.read_text()))
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=PUSH_IGNORE, repo_type="model")
    return str(repo_url)


def repo_id_of(args: argparse.Namespace) -> str:
    """``--hub_model_id``, or the output folder's name."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def create_repo(repo_id: str, token: str | None = None, private: bool = False, endpoint: str | None = None) -> str:
    """Create ``repo_id`` (or find it) and return its URL; any failure is a :class:`UserError` (one line)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub: the Hub is switched off here (HF_HUB_OFFLINE=1); "
                        "unset it or leave out --push_to_hub")
    try:
        return str(HfApi(endpoint=endpoint, token=token).create_repo(repo_id, private=private, exist_ok=True,
                                                                     repo_type="model"))
    except Exception as e:  # an HTTP status, a bad name or token, no network (huggingface_hub's own HTTP client errors)
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--push_to_hub: cannot create the Hub repository {repo_id!r}: {type(e).__name__}: {first} "
                        "(check --hub_model_id, the write token and the network)") from None


def prepare_push(accelerator: Any, args: argparse.Namespace) -> None:
    """At start-up, under ``--push_to_hub``: create the repository (main process), so that a push that
    would fail at the end fails now."""
    if args.push_to_hub and accelerator.is_main_process:
        create_repo(repo_id_of(args), token=args.hub_token, private=args.hub_private_repo)


def push_run(accelerator: Any, args: argparse.Namespace, results: Mapping[str, Any]) -> str | None:
    """At the end of a run: upload ``--output_dir`` (main process) and print the URL; ``None`` without ``--push_to_hub``.

    ``results`` (what ``all_results.json`` holds, the same on every process) must be finite: every process refuses
    a diverged run with the same :class:`UserError`, so none waits for a push that does not happen."""
    if args.push_to_hub:
        _refuse_non_finite(Path(args.output_dir), results)
    url = None
    if args.push_to_hub and accelerator.is_main_process:
        url = push_folder(args.output_dir, repo_id_of(args), token=args.hub_token, private=args.hub_private_repo)
        accelerator.print(f"Pushed to {url}")
    accelerator.wait_for_everyone()
    return url
