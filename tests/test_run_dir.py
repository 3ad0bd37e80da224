"""What a PPO run does with its output directory: a fresh run never mixes with an earlier one, a resumed run never
restarts from the initial weights, a failed step keeps the completed ones."""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ppo_engine import PROMPTS, _cfg, length_reward  # noqa: E402
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from rlhf_engine import Engine  # noqa: E402
from rlhf_engine.trainer.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402


def _run(tmp_path, out, steps, reward=length_reward, seed=3, **run):
    cfg = _cfg(tmp_path, run={"steps": steps, "output_dir": str(out), **run})
    eng = Engine(cfg, model=tiny_model(seed=seed), tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=reward)
    return eng, summary


def _actor(ckpt: Path) -> dict:
    return {k: v for k, v in load_checkpoint(ckpt)[0]["actor"].items() if not k.startswith("value_head.")}


def test_a_fresh_run_refuses_an_earlier_runs_directory_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    _run(tmp_path, out, 2, seed=3)
    with pytest.raises(ValueError, match="run.output_dir.*run.overwrite"):
        _run(tmp_path, out, 2, seed=4)
    eng, summary = _run(tmp_path, out, 2, seed=4, overwrite=True)
    # the final checkpoint holds this run's weights (it had been the earlier run's step-000002), and the metrics
    # file holds this run's steps only
    saved = _actor(Path(summary["checkpoint"]))
    for k, v in eng._model.state_dict().items():
        assert torch.equal(saved[k], v), k
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) == 1


@pytest.mark.parametrize("damage", ["state_json", "pointer_missing", "pointer_dangling", "crash_in_resave"])
def test_resume_with_a_damaged_latest_takes_the_newest_complete_checkpoint(tmp_path, damage):
    full, _ = _run(tmp_path, tmp_path / "a", 4, checkpoint_every=1, keep_checkpoints=3)
    out = tmp_path / "b"
    _run(tmp_path, out, 3, checkpoint_every=1, keep_checkpoints=3)
    root = out / "checkpoints"
    if damage == "state_json":  # the newest checkpoint lost a file: resume from step 2
        (root / "step-000003" / "state.json").unlink()
    elif damage == "pointer_missing":
        (root / "latest").unlink()
    elif damage == "pointer_dangling":
        (root / "latest").write_text("step-000009")
    else:  # a re-save of step 3 crashed between its two renames: only .old-step-000003 is left
        (root / "step-000003").rename(root / ".old-step-000003")
    with pytest.warns(UserWarning, match="run.resume"):
        resumed, _ = _run(tmp_path, out, 4, resume=True, checkpoint_every=1, keep_checkpoints=3)
    for k, v in full._model.state_dict().items():  # it did not restart from the initial weights
        assert torch.equal(resumed._model.state_dict()[k], v), k
    assert latest_checkpoint(root).name == "step-000004"
    assert (root / "step-000002" / "state.json").is_file()  # the earlier checkpoints were kept


def test_resume_refuses_checkpoint_directories_none_complete(tmp_path):
    out = tmp_path / "b"
    _run(tmp_path, out, 2, checkpoint_every=1)
    for d in (out / "checkpoints").glob("step-*"):
        (d / "state.json").unlink()
    with pytest.raises(ValueError, match="run.resume.*none is complete"):
        _run(tmp_path, out, 3, resume=True)


def test_a_corrupt_checkpoint_is_named(tmp_path):
    out = tmp_path / "b"
    _run(tmp_path, out, 2)
    ckpt = latest_checkpoint(out / "checkpoints")
    (ckpt / "actor.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"checkpoint {ckpt}.*corrupt"):
        _run(tmp_path, out, 3, resume=True)


@pytest.mark.parametrize("where", ["reward", "update"])
def test_a_step_that_raises_keeps_the_completed_steps(tmp_path, where):
    """Step 3 raises before its first optimizer step, in the reward function or in the update's forward (no
    checkpoint_every): steps 1-2 are checkpointed with step 3's prompts not yet drawn and, with normalize_rewards,
    its scores not yet counted, and a resumed run ends where an uninterrupted one does, bit for bit."""
    def trainer(out, steps, **kw):
        cfg = _cfg(tmp_path, run={"steps": steps, "output_dir": str(out), **kw}, ppo={"normalize_rewards": True})
        eng = Engine(cfg, model=tiny_model(seed=3), tokenizer=byte_tokenizer())
        return eng, eng.build_ppo_trainer(length_reward)

    full, t = trainer(tmp_path / "a", 4)
    t.train(PROMPTS)
    out = tmp_path / "b"
    _, t = trainer(out, 4)
    calls, real_reward, real_update = [], t.reward, t.update

    def flaky_reward(prompts, responses):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward server down")
        return real_reward(prompts, responses)

    def flaky_update(ro):
        if t.step_idx == 2:
            raise RuntimeError("out of memory in the forward")
        return real_update(ro)

    if where == "reward":
        t.reward = flaky_reward
    else:
        t.update = flaky_update
    with pytest.warns(UserWarning, match="2 completed steps were checkpointed"), pytest.raises(RuntimeError):
        t.train(PROMPTS)
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    resumed, t = trainer(out, 4, resume=True)
    t.train(PROMPTS)
    for k, v in full._model.state_dict().items():
        assert torch.equal(resumed._model.state_dict()[k], v), k


def _adaptive(tmp_path, out, steps, **run):
    cfg = _cfg(tmp_path, run={"steps": steps, "output_dir": str(out), **run}, ppo={"adaptive_kl": True,
                                                                                    "kl_target": 0.01})
    eng = Engine(cfg, model=tiny_model(seed=3), tokenizer=byte_tokenizer())
    return eng, eng.build_ppo_trainer(length_reward)


def test_an_error_after_a_completed_step_checkpoints_that_step(tmp_path, monkeypatch):
    """An error once step 3 is complete (in the history: logging, the periodic save) keeps step 3 as it is: its
    weights, its KL coefficient and its history, so that a resumed run ends as an uninterrupted one does."""
    full, t_full = _adaptive(tmp_path, tmp_path / "a", 4)
    t_full.train(PROMPTS)
    eng, trainer = _adaptive(tmp_path, tmp_path / "b", 4)

    import rlhf_engine.trainer.ppo as ppo_mod

    class FailingAt3(ppo_mod.MetricsLogger):
        def log(self, step, metrics):
            if step == 3:
                raise OSError("disk full while logging")
            super().log(step, metrics)

    monkeypatch.setattr(ppo_mod, "MetricsLogger", FailingAt3)
    with pytest.warns(UserWarning, match="3 completed steps"), pytest.raises(OSError):
        trainer.train(PROMPTS)
    monkeypatch.undo()
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.name == "step-000003"
    assert [h["step"] for h in load_checkpoint(ckpt)[1]["history"]] == [1, 2, 3]
    resumed, t_res = _adaptive(tmp_path, tmp_path / "b", 4, resume=True)
    t_res.train(PROMPTS)
    assert t_res.kl_ctl.value == t_full.kl_ctl.value
    for k, v in full._model.state_dict().items():
        assert torch.equal(resumed._model.state_dict()[k], v), k


def test_an_error_between_a_steps_update_and_its_record_saves_nothing(tmp_path):
    """Step 3 raises after its optimizer steps, before it is complete (here in the KL controller's update, as
    Ctrl-C in its metrics' sync would): neither step 2's state nor step 3's can be written, so nothing is."""
    _, trainer = _adaptive(tmp_path, tmp_path / "b", 4)
    real = trainer.kl_ctl.update

    def failing(kl, n_steps):
        if trainer.step_idx == 3:
            raise KeyboardInterrupt
        real(kl, n_steps)

    trainer.kl_ctl.update = failing
    with pytest.raises(KeyboardInterrupt):
        trainer.train(PROMPTS)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints") is None


def test_a_step_that_fails_after_changing_weights_saves_nothing(tmp_path):
    eng = Engine(_cfg(tmp_path, run={"steps": 3}), model=tiny_model(), tokenizer=byte_tokenizer())
    trainer = eng.build_ppo_trainer(length_reward)
    real, n = trainer.update, []

    def failing_update(ro):
        n.append(1)
        out = real(ro)
        if len(n) == 2:
            raise RuntimeError("out of memory after the optimizer step")
        return out

    trainer.update = failing_update
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(PROMPTS)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_resume_names_changed_settings_before_touching_the_model(tmp_path):
    out = tmp_path / "b"
    _run(tmp_path, out, 2, checkpoint_every=1)
    cfg = _cfg(tmp_path, run={"steps": 3, "output_dir": str(out), "resume": True}, ppo={"critic": "separate"})
    model = tiny_model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="run.resume: the checkpoint .* ppo.critic was 'shared', is 'separate'"):
        Engine(cfg, model=model, tokenizer=byte_tokenizer()).train_ppo(PROMPTS, reward=length_reward)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="started from other weights"):  # another initial model
        _run(tmp_path, out, 3, seed=5, resume=True)
    cfg = _cfg(tmp_path, run={"steps": 3, "output_dir": str(out), "resume": True}, optim={"lr": 1e-4})
    with pytest.warns(UserWarning, match=r"optim.lr 0.001 -> 0.0001"):
        Engine(cfg, model=tiny_model(seed=3), tokenizer=byte_tokenizer()).train_ppo(PROMPTS, reward=length_reward)


def test_resume_takes_changes_that_leave_the_run_the_same(tmp_path):
    """How the model runs, and LoRA settings while LoRA is off, are not the run's shape; the weights decide."""
    out = tmp_path / "b"
    _run(tmp_path, out, 2, checkpoint_every=1)
    cfg = _cfg(tmp_path, run={"steps": 3, "output_dir": str(out), "resume": True},
               model={"gradient_checkpointing": True, "dtype": "float32"}, lora={"rank": 4})
    eng = Engine(cfg, model=tiny_model(seed=3), tokenizer=byte_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        assert eng.train_ppo(PROMPTS, reward=length_reward)["steps"] == 3


def test_the_pipeline_refuses_an_earlier_run_before_sampling(tmp_path):
    from rlhf_engine.pipeline import run_pipeline

    out = tmp_path / "b"
    _run(tmp_path, out, 1)
    eng = Engine(_cfg(tmp_path, run={"output_dir": str(out)}), model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="run.output_dir"):
        run_pipeline(eng)
    assert not (out / "preference_pairs.jsonl").exists()
