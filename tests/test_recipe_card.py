"""The model card: its template is a package resource (a wheel install renders cards), it links only to what
exists, and it states the hyperparameters actually used when a resume changed some (issue 11, case 4)."""

from __future__ import annotations

import argparse
from importlib import resources

from hf_weyl.recipe import model_card
from hf_weyl.recipe.tracking import TrainLog


def test_template_is_read_from_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no source tree around: only the package
    package, name = model_card.TEMPLATE
    ref = resources.files(package).joinpath(name)
    assert ref.is_file()
    import hf_weyl.recipe

    assert str(ref).startswith(str(resources.files(hf_weyl.recipe)))
    assert model_card.default_template() == ref.read_text(encoding="utf-8")


def test_card_links_only_to_what_exists():
    text = model_card.default_template()
    assert "https://arxiv.org/abs/2505.21910" in text
    assert "github.com" not in text  # the project has no public repository yet


def _card(changes, commands):
    args = argparse.Namespace(optimizer="adamw_weyl", tau=0.02, power_iters=1, learning_rate=3e-4, warmup_steps=0,
                              lr_scheduler_type="cosine", beta1=0.9, beta2=0.95, adam_epsilon=1e-8, weight_decay=0.1,
                              max_grad_norm=1.0, max_train_steps=100, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, seed=0)
    hp = model_card.training_hyperparameters(args, 1, changes=changes)
    card = model_card.render_model_card(
        model_name="m", summary="s", task_type="text-generation", task_name="t", dataset_id="d", dataset_name="d",
        metrics=[model_card.CardMetric("loss", "validation loss", 1.0)], hyperparameters=hp,
        plots={"loss": "plots/loss.png", "cap": "plots/cap.png"}, reproduce_command=commands, optimizer="adamw_weyl",
        warmup_steps=0)
    return hp, str(card)


def test_card_states_each_value_with_its_steps():
    log = TrainLog(["--learning_rate", "6e-4"])
    log.completed_steps = 30
    log.record_changes({"learning_rate": (6e-4, 3e-4)}, ["--learning_rate", "3e-4"])
    log.completed_steps = 60
    log.record_changes({"learning_rate": (3e-4, 3e-4 / 2), "tau": (0.01, 0.02)}, ["--learning_rate", "1.5e-4"])
    assert log.changes() == [(31, "learning_rate", 6e-4, 3e-4), (61, "learning_rate", 3e-4, 1.5e-4), (61, "tau", 0.01, 0.02)]
    assert [r["step"] for r in log.history] == [31, 61] and [x["step"] for x in log.launches] == [0, 30, 60]
    hp, text = _card(log.changes(), ["accelerate launch a", "accelerate launch b --resume_from_checkpoint c"])
    assert hp["learning rate (peak)"] == "0.0006 (steps 1–30), 0.0003 (steps 31–60), 0.00015 (steps 61–100)"
    assert hp["tau (τ)"] == "0.01 (steps 1–60), 0.02 (steps 61–100)"
    assert "these commands, in order," in text and "accelerate launch a\naccelerate launch b --resume_from_checkpoint c" in text
    hp, text = _card([], "accelerate launch a")
    assert hp["learning rate (peak)"] == 3e-4 and "these commands" not in text and "accelerate launch a\n```" in text


def _rendered(metrics):
    return model_card.render_model_card(
        model_name="m", summary="s", task_type="image-classification", task_name="t", dataset_id="d", dataset_name="d",
        metrics=metrics, hyperparameters={}, plots={"loss": "plots/loss.png", "cap": "plots/cap.png"},
        reproduce_command="accelerate launch a", optimizer="adamw_weyl", warmup_steps=0)


def test_non_finite_metric_never_lands_in_the_card_as_a_result():
    """A NaN or inf metric (the run diverged): the card says so first, the table marks it, the metadata reports no
    result at all (not even the finite accuracy of a NaN model)."""
    from huggingface_hub import ModelCard

    for value, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (None, "None")):
        metrics = [model_card.CardMetric("accuracy", "top-1 accuracy", 0.1),
                   model_card.CardMetric("loss", "validation loss", value)]
        assert model_card.diverged_reason(metrics) == f"diverged: validation loss is {shown}"
        card = ModelCard(str(_rendered(metrics)))
        assert card.data.eval_results is None and "model-index" not in card.content and "diverged" in card.data.tags
        assert card.text.lstrip().startswith(f"# m\n\n**Training diverged: validation loss is {shown}.**")
        assert f"| validation loss | validation | {shown} (diverged: not a result) |" in card.text
        assert "| top-1 accuracy | validation | 0.1000 (of a diverged run: not a result) |" in card.text
    finite = [model_card.CardMetric("accuracy", "top-1 accuracy", 0.5), model_card.CardMetric("loss", "validation loss", 1.25)]
    card = ModelCard(str(_rendered(finite)))
    assert model_card.diverged_reason(finite) is None
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"accuracy": 0.5, "loss": 1.25}
    assert "diverged" not in card.content and "| validation loss | validation | 1.2500 |" in card.text
