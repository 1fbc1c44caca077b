"""Recipe-support tier (accelerate, datasets, evaluate, huggingface_hub, tokenizers, matplotlib).

Shared plumbing of the ``recipes/`` scripts: offline presets, data loading, checkpoint I/O, logging,
model cards (templates in ``model_cards/`` inside this package) and the Hub upload.
"""
