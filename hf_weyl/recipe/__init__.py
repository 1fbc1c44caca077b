"""Recipe-support tier (accelerate, datasets, evaluate, huggingface_hub, tokenizers, matplotlib).

The plumbing the ``recipes/`` scripts share and no user needs to change; each script keeps its own
training loop, top to bottom.

* ``cli``: the common options and their start-up checks; ``errors``: one-line user errors (exit code 2);
* ``run``: the output folder (writable?), the checkpoint to resume from (complete? same run?), the resume;
* ``checkpoint``: atomic ``checkpoints/step_N`` folders with a manifest; ``tracking``: ``TrainLog``, cap statistics;
* ``training``: accelerator, optimizer, scheduler; ``data`` / ``presets``: data loading and the offline presets;
* ``output`` / ``model_card`` (templates in ``model_cards/`` inside this package) / ``plotting`` / ``hub``:
  the Hub-ready folder, its card and plots, and the upload.
"""
