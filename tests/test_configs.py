"""Every shipped file under recipes/configs/ is loaded by the code that reads it, on CPU as far as a CPU allows.

* accelerate config files (``*.yaml``): ``accelerate launch --config_file`` itself, stopped where it would start
  the processes; in the environment it hands them, what a rank builds from it (the ``DeepSpeedPlugin`` with its
  mixed precision, as ``AcceleratorState`` does), or ``Accelerator()`` itself where one CPU process can;
* DeepSpeed JSON files: hf_weyl's start-up check, the "auto" values filled by accelerate (and by the HF Trainer
  for the ``"auto"``-precision ones), then DeepSpeed's own ``DeepSpeedConfig``;
* the README's CPU command for a recipe under DeepSpeed: 2 real ranks, ZeRO-2 (ds_zero2_cpu.yaml), 2 steps.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"

#: accelerate config → (how accelerate launch starts it, processes, mixed precision, DeepSpeed JSON or None)
YAMLS = {
    "cpu.yaml": ("subprocess", 1, "no", None),
    "single_gpu.yaml": ("subprocess", 1, "bf16", None),
    "multi_gpu.yaml": ("torchrun", 8, "bf16", None),
    "ds_zero2.yaml": ("torchrun", 8, "bf16", "ds_zero2_bf16.json"),
    "ds_zero3.yaml": ("torchrun", 8, "bf16", "ds_zero3_bf16.json"),
    "ds_zero2_cpu.yaml": ("torchrun", 2, "no", "ds_zero2.json"),
}
#: DeepSpeed JSON → (ZeRO stage, precision: "auto" (follows --bf16/--fp16 or the accelerate config) or "bf16")
JSONS = {
    "ds_zero2.json": (2, "auto"),
    "ds_zero3.json": (3, "auto"),
    "ds_zero2_bf16.json": (2, "bf16"),
    "ds_zero3_bf16.json": (3, "bf16"),
}


def test_every_shipped_config_is_loaded_by_a_test():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted({*YAMLS, *JSONS})
    assert {ds for *_, ds in YAMLS.values() if ds} <= set(JSONS)


@pytest.fixture(autouse=True)
def no_deepspeed_config_left_announced():
    """The plugin and TrainingArguments announce their DeepSpeed config process-wide (transformers' weakref)."""
    yield
    if "transformers.integrations.deepspeed" in sys.modules:
        sys.modules["transformers.integrations.deepspeed"].unset_hf_deepspeed_config()


def launched_environment(config: Path, monkeypatch) -> dict:
    """What ``accelerate launch --config_file CONFIG train.py`` hands the processes it would start."""
    from accelerate.commands import launch

    seen = {}

    def torchrun(args):  # (called inside the launcher's patched environment)
        seen.update(launcher="torchrun", env=dict(os.environ), processes=args.num_processes)

    def subprocess_(cmd, env, quiet):
        seen.update(launcher="subprocess", env=dict(env), processes=1, cmd=cmd)

    monkeypatch.chdir(ROOT)  # the configs name their DeepSpeed JSON relative to the repository root
    with mock.patch.object(launch, "_run_torchrun", torchrun), \
            mock.patch.object(launch, "_run_subprocess", subprocess_):
        launch.launch_command(launch.launch_command_parser().parse_args(["--config_file", str(config), "train.py"]))
    return seen


def fill_auto_values(plugin, processes: int = 1) -> dict:
    """The "auto" values, filled by accelerate's own ``deepspeed_config_process`` as its ``_prepare_deepspeed`` does
    (micro batch 4, accumulation 2, a hidden size of 64)."""
    hidden = 64
    plugin.deepspeed_config_process(
        must_match=False, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
        train_batch_size=4 * 2 * processes, gradient_clipping=1.0,
        **{"zero_optimization.reduce_bucket_size": hidden * hidden,
           "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
           "zero_optimization.stage3_param_persistence_threshold": 10 * hidden},
    )
    config = plugin.deepspeed_config
    assert "auto" not in json.dumps(config), config
    return config


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_accelerate_config_launches_what_it_says(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    launcher, processes, precision, ds_json = YAMLS[name]
    loaded = load_config_from_file(str(CONFIGS / name))  # accelerate's own loader (ClusterConfig)
    assert loaded.num_processes == processes
    seen = launched_environment(CONFIGS / name, monkeypatch)
    assert (seen["launcher"], seen["processes"]) == (launcher, processes)
    env = seen["env"]
    if ds_json is None:
        assert env.get("ACCELERATE_USE_DEEPSPEED", "false") == "false"
        assert env["ACCELERATE_MIXED_PRECISION"] == precision
        if launcher == "subprocess":  # one process: the Accelerator itself (on CPU; a GPU config gets the CPU here)
            code = textwrap.dedent("""
                import json
                from accelerate import Accelerator
                a = Accelerator()
                print(json.dumps([str(a.distributed_type), a.num_processes, a.mixed_precision, a.device.type]))
            """)
            proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert json.loads(proc.stdout.splitlines()[-1]) == ["DistributedType.NO", 1, precision, "cpu"]
        return
    # DeepSpeed: what each rank's AcceleratorState builds from that environment (accelerate refuses
    # mixed_precision next to deepspeed_config_file here, in DeepSpeedPlugin.__post_init__)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"recipes/configs/{ds_json}"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
        plugin.set_deepspeed_weakref()  # (ZeRO-3 with zero3_init_flag: transformers' HfDeepSpeedConfig)
    config = fill_auto_values(plugin, processes)
    assert config["bf16"]["enabled"] is (precision == "bf16") and config["fp16"]["enabled"] is False
    assert plugin.zero_stage == JSONS[ds_json][0]
    assert plugin.zero3_init_flag is (plugin.zero_stage == 3)


@pytest.mark.parametrize("name", sorted(JSONS))
def test_deepspeed_config_is_accepted_by_hf_weyl_and_deepspeed(name, tmp_path):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from hf_weyl.integrations.deepspeed import check_deepspeed_config

    stage, precision = JSONS[name]
    path = CONFIGS / name
    raw = json.loads(path.read_text())
    assert "optimizer" not in raw  # the engine must take hf_weyl's AdamWeyl as a client optimizer
    check_deepspeed_config(raw)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    plugin.set_mixed_precision("no")  # (an "auto" JSON then trains in fp32; a bf16 JSON keeps bf16)
    filled = fill_auto_values(plugin)
    check_deepspeed_config(filled)
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == stage and ds.train_batch_size == 8
    assert ds.bfloat16_config.enabled is (precision == "bf16")
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save  # save_pretrained gets the whole weights
    if precision == "auto":  # the HF Trainer's: --deepspeed JSON fills "auto" from TrainingArguments
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), use_cpu=True, report_to="none",
                                 per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="adamw_weyl")
        hf = args.hf_deepspeed_config.config
        assert "auto" not in json.dumps({k: v for k, v in hf.items() if k != "zero_optimization"}), hf
        check_deepspeed_config(hf)


# --- the README's CPU route: a recipe under DeepSpeed on 2 ranks ---------------------------------------------------


def readme_cpu_deepspeed_command() -> list[str]:
    """The README's command line that runs a recipe under DeepSpeed on 2 CPU ranks."""
    (line,) = [ln for ln in (ROOT / "README.md").read_text().splitlines()
               if "ds_zero2_cpu.yaml" in ln and ln.lstrip().startswith("DS_ACCELERATOR=cpu")]
    return shlex.split(line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_cpu_deepspeed_command_trains_a_recipe_on_two_ranks(tmp_path):
    words = readme_cpu_deepspeed_command()
    env_words = [w for w in words[: words.index("accelerate")] if "=" in w]
    env = {**os.environ, **dict(w.split("=", 1) for w in env_words)}
    assert env["DS_ACCELERATOR"] == "cpu"
    args = words[words.index("accelerate") + 1:]
    assert args[0] == "launch" and "--output_dir" in args
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), *args[1:],
           "--max_train_steps", "2", "--eval_steps", "2", "--max_eval_batches", "1", "--logging_steps", "1",
           "--checkpointing_steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    assert json.loads((out / "all_results.json").read_text())["step"] == 2
    card = (out / "README.md").read_text()
    assert "| processes | 2 |" in card and "| effective batch size | 32 |" in card  # accelerate counts both ranks
    step = out / "checkpoints" / "step_2"
    # a DeepSpeed ZeRO checkpoint: the optimizer state in one partition per rank; accelerate's RNG state per rank
    assert sorted(p.name for p in (step / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in step.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
