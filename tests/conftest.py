import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The comparison baselines live beside the benchmark scripts (benchmarks/baselines.py), not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def make_tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2, n_embd: int = 32, vocab: int = 97):
    """A small randomly initialised GPT-2 (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(dtype)


def token_batches(n: int, batch: int = 4, seq: int = 16, vocab: int = 97, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2


def trainer_args(tmp_path, **kw):
    """``TrainingArguments`` for a small CPU Trainer run in ``tmp_path`` (no reporters, no saving, no tqdm)."""
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


class TokenDataset(torch.utils.data.Dataset):
    """``n`` rows of :func:`token_batches` as a language-modelling dataset (labels = inputs)."""

    def __init__(self, n=32):
        self.rows = torch.cat(token_batches(n // 4))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}
