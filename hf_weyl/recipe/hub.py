"""Upload a recipe's output folder to the Hugging Face Hub (create the repo, upload, return the URL).

The endpoint is ``HF_ENDPOINT`` (default https://huggingface.co): the real Hub needs network access
and a write token (``--hub_token``, ``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PUSH_IGNORE", "push_folder"]

#: Not uploaded: resumable training state (large, not needed to use the model) and temp files.
PUSH_IGNORE = ["checkpoints/**", ".tmp_*", "**/.tmp_*", "*.tmp"]


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model trained with hf_weyl (AdamW², no warmup)",
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` except :data:`PUSH_IGNORE`; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no README.md (model card); is it a finished recipe output folder?")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=PUSH_IGNORE, repo_type="model")
    return str(repo_url)
