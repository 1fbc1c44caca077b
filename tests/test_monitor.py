"""The training monitor: spectra, layouts (GPT-2 / ViT / Llama-GQA / explicit), probe pass, callback, plots."""

import json
import math
import os

import pytest
import torch
import transformers as tf

import hf_weyl
from hf_weyl.monitor import (
    CollapseDetector,
    ModelLayout,
    UnsupportedModelError,
    WeylMonitorCallback,
    attention_entropy,
    collect_metrics,
    qk_singular_values,
    resolve_layout,
    sec_index,
)
from hf_weyl.monitor.plots import plot_lr_ratios, plot_sec_curves, plot_trajectories


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16))


def vit():
    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4, num_labels=3)
    return tf.ViTForImageClassification(cfg)


def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=50)
    return tf.LlamaForCausalLM(cfg)


def text_batch(n=2):
    x = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": x, "labels": x}


def image_batch():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}


def test_qk_singular_values_match_explicit_product():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 10, generator=g), torch.randn(3, 4, 10, generator=g)
    expected = torch.stack([torch.linalg.svdvals(q[h].T @ k[h])[:4] for h in range(3)])
    torch.testing.assert_close(qk_singular_values(q, k), expected, rtol=1e-4, atol=1e-5)


def test_sec_index_and_entropy_known_values():
    sv = torch.tensor([[3.0, 4.0 * 0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(sec_index(sv, 1), torch.tensor([1.0, 1 / 3, 0.0]))
    torch.testing.assert_close(sec_index(sv, 2), torch.tensor([1.0, 2 / 3, 0.0]))
    uniform = torch.full((1, 2, 3, 5), 0.2)
    onehot = torch.zeros(1, 2, 3, 5)
    onehot[..., 0] = 1
    torch.testing.assert_close(attention_entropy(uniform), torch.full((2,), math.log(5)))
    torch.testing.assert_close(attention_entropy(onehot), torch.zeros(2))


@pytest.mark.parametrize("make, batch", [(gpt2, text_batch), (vit, image_batch), (llama, text_batch)])
def test_collect_metrics_per_family(make, batch):
    model = make()
    layout = resolve_layout(model)
    w = layout.block_weights(layout.block_modules(model)[1])
    expected = max(float(torch.linalg.matrix_norm(w.query[h].T @ w.key[h], ord=2)) for h in range(4))
    model.train()
    impl = model.config._attn_implementation
    m = collect_metrics(model, batch())
    assert m["monitor/b1/sigma_qk_max"] == pytest.approx(expected, rel=1e-4)
    for key in ("sigma_q", "sigma_k", "sigma_v", "sigma_o", "sec1_max", "entropy_min", "input_norm", "input_grad_norm"):
        assert math.isfinite(m[f"monitor/b1/{key}"]) and m[f"monitor/b1/{key}"] > 0, key
    assert 0 < m["monitor/b0/entropy_h3"] <= math.log(17) + 1e-4
    assert any(k.startswith("monitor/b0/norm_") for k in m)
    assert model.training and model.config._attn_implementation == impl  # restored
    assert all(p.grad is None for p in model.parameters())  # probe pass never writes .grad


def test_gpt2_layout_splits_fused_conv1d():
    model = gpt2()
    w = resolve_layout(model).block_weights(model.transformer.h[0])
    c = model.transformer.h[0].attn.c_attn.weight  # (in, 3*out)
    torch.testing.assert_close(w.query[1], c[:, 8:16].T)
    torch.testing.assert_close(w.key[2], c[:, 32 + 16 : 32 + 24].T)


def test_llama_grouped_kv_heads_pair_each_query_head_with_its_kv_head():
    model = llama()
    w = resolve_layout(model).block_weights(model.model.layers[0])
    k = model.model.layers[0].self_attn.k_proj.weight  # (2 kv heads * 8, 32)
    assert w.key.shape == (4, 8, 32)
    torch.testing.assert_close(w.key[0], k[:8])
    torch.testing.assert_close(w.key[1], k[:8])
    torch.testing.assert_close(w.key[3], k[8:])


def test_explicit_layout_for_other_models_and_clear_error_without():
    torch.manual_seed(0)
    bert = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM.*ModelLayout"):
        collect_metrics(bert, text_batch())
    layout = ModelLayout(
        blocks="bert.encoder.layer", num_heads=4, query="attention.self.query", key="attention.self.key",
        value="attention.self.value", output="attention.output.dense", mlp=("intermediate.dense", "output.dense"),
        norms=("attention.output.LayerNorm",),
    )
    m = collect_metrics(bert, text_batch(), layout=layout)
    assert m["monitor/b1/sigma_qk_max"] > 0 and m["monitor/b1/entropy_min"] > 0
    with pytest.raises(UnsupportedModelError, match="nope"):
        collect_metrics(bert, layout=ModelLayout(blocks="nope", num_heads=4, query="q", key="k"))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelLayout(blocks="x", num_heads=4, num_kv_heads=3, query="q", key="k")


def test_optimizer_metrics_from_adamweyl():
    model = gpt2()
    opt = hf_weyl.AdamWeyl(model.parameters(), lr=0.5, tau=0.01)
    model(**text_batch()).loss.backward()
    opt.step()
    m = collect_metrics(model, None, opt)
    ratios = {k: v for k, v in m.items() if k.startswith("monitor/lr_ratio/")}
    assert len(ratios) == len(list(model.parameters()))
    assert ratios["monitor/lr_ratio/transformer.h.0.attn.c_attn.weight"] < 1  # lr 0.5 is far above τ·σ/σ_U
    assert m["monitor/capped_fraction"] > 0 and "monitor/b0/entropy_min" not in m


def test_trainer_callback_logs_jsonl_and_rejects_unsupported(tmp_path):
    model = gpt2()
    data = [{"input_ids": torch.randint(0, 50, (8,)).tolist()} for _ in range(32)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                optim="adamw_weyl", learning_rate=1e-3, save_strategy="no", disable_tqdm=True, use_cpu=True)
    def collator(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids}

    cb = WeylMonitorCallback(interval=2)
    tf.Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[cb]).train()
    assert [h["step"] for h in cb.history] == [1, 2, 4]
    assert "monitor/lr_ratio/transformer.h.1.mlp.c_fc.weight" in cb.history[-1]
    lines = open(os.path.join(tmp_path, "weyl_monitor.jsonl")).read().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 4]
    with pytest.raises(ValueError, match="interval"):
        WeylMonitorCallback(interval=0)
    bert = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError):
        tf.Trainer(model=bert, args=args, train_dataset=data, data_collator=collator, callbacks=[WeylMonitorCallback()]).train()


def test_detector_validation_and_synthetic_trajectory():
    with pytest.raises(ValueError, match="sec_level"):
        CollapseDetector(sec_level=1.5)
    det = CollapseDetector(window=2)
    rec = lambda s, h, sec: {"monitor/b0/sigma_qk_max": s, "monitor/b0/entropy_min": h, "monitor/b0/sec1_max": sec}  # noqa: E731
    assert det.update(rec(1.0, 3.0, 0.3), 0) == []
    assert det.update(rec(5.0, 2.0, 0.95), 1) == []  # entropy only down to 2/3: not yet
    with pytest.warns(hf_weyl.monitor.CollapseWarning, match="block 0"):
        alerts = det.update(rec(20.0, 0.1, 0.99), 2)
    assert CollapseDetector().update(rec(1.0, 3.0, 0.3), 0) == []
    assert [a.step for a in alerts] == [2] and det.collapsed
    assert det.update(rec(80.0, 0.01, 0.99), 3) == []  # one alert per block


def test_plots_write_pngs(tmp_path):
    model = gpt2()
    opt = hf_weyl.AdamWeyl(model.parameters(), lr=1e-2)
    history = []
    for step in range(1, 4):
        model(**text_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({"step": step, **collect_metrics(model, text_batch(), opt)})
    for fn in (plot_trajectories, plot_sec_curves, plot_lr_ratios):
        path = fn(history, str(tmp_path / f"{fn.__name__}.png"))
        assert os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="no monitor"):
        plot_trajectories([{"step": 1}], str(tmp_path / "x.png"))


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend is its own: plotting (monitor and recipe plots) selects none and registers no
    pyplot figure. A fresh interpreter, so that no other test has imported pyplot before."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import torch, transformers as tf, hf_weyl
        from hf_weyl.monitor import collect_metrics
        from hf_weyl.monitor.plots import plot_lr_ratios, plot_sec_curves, plot_trajectories
        from hf_weyl.recipe.plotting import plot_comparison, plot_training
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
        opt = hf_weyl.AdamWeyl(model.parameters(), lr=1e-2)
        x = torch.randint(0, 50, (2, 8))
        history = []
        for step in (1, 2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step(); opt.zero_grad()
            history.append({{"step": step, **collect_metrics(model, {{"input_ids": x}}, opt)}})
        out = {str(tmp_path)!r}
        for fn in (plot_trajectories, plot_sec_curves, plot_lr_ratios):
            fn(history, f"{{out}}/{{fn.__name__}}.png")
        log = [{{"step": 1, "train_loss": 2.0, "lr": 1e-3, "cap/capped_fraction": 0.5}}, {{"step": 2, "train_loss": 1.5}}]
        plot_training(log, out)
        plot_comparison({{"a": log}}, f"{{out}}/cmp.png")
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    for name in ("plot_trajectories", "plot_sec_curves", "plot_lr_ratios", "loss", "cap", "cmp"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_renamed_transformers_attention_attribute_fails_closed_naming_the_version(monkeypatch):
    """The probe pass reads transformers' private config._attn_implementation (to switch to eager attention):
    if a release renames it, a clear error naming the transformers version, not a silent skip of the switch."""
    model = gpt2()
    model.set_attn_implementation("sdpa")
    owner = next(c for c in type(model.config).__mro__ if "_attn_implementation" in vars(c))
    monkeypatch.delattr(owner, "_attn_implementation")
    with pytest.raises(RuntimeError, match=f"transformers {tf.__version__} has no GPT2Config._attn_implementation"):
        collect_metrics(model, text_batch(), None)


def test_zero3_partitioned_parameters_refused_even_after_a_whole_one():
    """ZeRO-3 keeps small parameters whole (stage3_param_persistence_threshold): a partitioned parameter after a
    whole first one must still be refused (the check used to look at the first parameter only)."""
    model = gpt2()
    params = list(model.parameters())
    params[0].ds_id = 0  # whole: kept by ZeRO-3
    params[1].ds_id = 1
    params[1].data = torch.empty(0)  # partitioned away from this rank
    with pytest.raises(NotImplementedError, match="partitioned"):
        collect_metrics(model)
