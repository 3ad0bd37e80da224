"""Engine.train_ppo end to end on a tiny random model on the CPU."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from rlhf_engine import Engine, EngineConfig  # noqa: E402
from rlhf_engine.trainer.checkpoint import latest_checkpoint  # noqa: E402

PROMPTS = ["hello", "the movie", "abc", "x y z", "good", "it was", "a film", "why"]


def _cfg(tmp_path, **sections):
    base = {
        "model": {"name_or_path": "preset:tiny-llama"},
        "generation": {"max_new_tokens": 6, "max_prompt_len": 16},
        "ppo": {"minibatch_size": 4, "micro_batch_size": 2, "epochs": 2},
        "optim": {"lr": 1e-3},
        "run": {"steps": 3, "prompts_per_step": 4, "device": "cpu", "output_dir": str(tmp_path / "run"),
                "progress": False, "tensorboard": False, "plot": False},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return base


def length_reward(prompts, responses):
    return [len(r) / 6.0 for r in responses]


def test_ppo_tiny_runs_and_updates_only_the_actor(tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    eng = Engine(_cfg(tmp_path), model=model, tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=length_reward)
    hist = [h for h in summary["history"] if "loss/policy" in h]
    assert len(hist) == 3
    for h in hist:
        for k in ("loss/policy", "loss/value", "policy/entropy", "kl/mean", "reward/mean"):
            assert math.isfinite(h[k]), (k, h[k])
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the actor did not change"
    trainer = eng.last_trainer
    for k, v in trainer.reference.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # the reference is frozen
    # generation and training share the same parameter tensors: nothing was re-allocated
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None


def test_critic_learns_a_constant_reward(tmp_path):
    cfg = _cfg(tmp_path, ppo={"vf_coef": 1.0, "epochs": 4, "value_clip": None, "kl_coef": 0.0},
               optim={"lr": 3e-3}, run={"steps": 6})
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=lambda p, r: [2.0] * len(r))
    hist = [h for h in summary["history"] if "loss/value" in h]
    # returns are 2 everywhere (gamma=1, no KL): the value loss must fall by a large factor
    assert hist[-1]["loss/value"] < 0.25 * hist[0]["loss/value"]
    assert abs(hist[-1]["critic/value_mean"] - 2.0) < 0.6


def test_resume_reproduces_uninterrupted_run(tmp_path):
    def run(out, steps, resume):
        cfg = _cfg(tmp_path, run={"steps": steps, "output_dir": str(out), "resume": resume, "checkpoint_every": 1})
        eng = Engine(cfg, model=tiny_model(seed=3), tokenizer=byte_tokenizer())
        eng.train_ppo(PROMPTS, reward=length_reward)
        return eng._model.state_dict(), eng.last_trainer

    full, t_full = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    resumed, t_res = run(tmp_path / "b", 4, True)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    torch.testing.assert_close(t_res.value_head.weight, t_full.value_head.weight, rtol=0, atol=0)


def test_nan_reward_skips_the_step_and_keeps_weights(tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    eng = Engine(_cfg(tmp_path, run={"steps": 2}), model=model, tokenizer=byte_tokenizer())
    with pytest.warns(UserWarning, match="none of the 2 steps of this run updated the weights"):
        summary = eng.train_ppo(PROMPTS, reward=lambda p, r: [float("nan")] * len(r))
    assert summary["skipped_steps"] == 2 and summary["skipped_updates"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp", "dr_grpo"])
def test_critic_free_estimators_run(tmp_path, advantage):
    cfg = _cfg(tmp_path, ppo={"advantage": advantage, "samples_per_prompt": 2, "kl_loss_coef": 0.01},
               run={"steps": 1, "prompts_per_step": 2})
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=length_reward)
    h = [h for h in summary["history"] if "loss/policy" in h][0]
    assert math.isfinite(h["loss/policy"]) and "loss/value" not in h
    # kl/coef is the beta the rewards carried: the group estimators take the KL in the loss only
    assert h["kl/coef"] == (0.05 if advantage.startswith("reinforce_pp") else 0.0)


def test_lora_reference_is_the_base_model_without_a_copy(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model.state_dict())
    cfg = _cfg(tmp_path, lora={"enabled": True, "rank": 4, "alpha": 8.0}, run={"steps": 2})
    eng = Engine(cfg, model=model, tokenizer=byte_tokenizer())
    eng.train_ppo(PROMPTS, reward=length_reward)
    trainer = eng.last_trainer
    assert trainer.reference is None  # the reference is the actor with adapters disabled
    sd = model.state_dict()
    for k, v in base.items():
        assert torch.equal(sd[k], v), f"base weight {k} changed under LoRA"
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_separate_critic(tmp_path):
    cfg = _cfg(tmp_path, ppo={"critic": "separate"}, run={"steps": 1})
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=length_reward)
    assert eng.last_trainer.critic is not None and eng.last_trainer.value_head is None
    assert eng.last_trainer.critic.model is not eng._model.model  # its own trunk
    assert math.isfinite([h for h in summary["history"] if "loss/value" in h][0]["loss/value"])


def test_separate_critic_trains_in_train_mode_with_recomputation(tmp_path, monkeypatch):
    """A loaded (eval-mode) policy with gradient checkpointing: the separate critic copied from it is switched to
    train mode for the update and recomputes its layers as the actor does (it had stayed in eval mode, where
    layers are never recomputed: ~6 GB more activations at the Qwen2-0.5B benchmark shape)."""
    import rlhf_engine.model.llama as llama

    calls = {"actor": 0, "critic": 0}
    real = llama.checkpoint_layer
    cfg = _cfg(tmp_path, ppo={"critic": "separate", "epochs": 1}, run={"steps": 1})
    model = tiny_model().eval()
    model.gradient_checkpointing = True
    eng = Engine(cfg, model=model, tokenizer=byte_tokenizer())

    def counting(fn, *args, **kw):
        layer = getattr(fn, "__self__", fn)  # a layer, or its bound forward_fused
        owner = "actor" if any(layer is a for a in model.model.layers) else "critic"
        calls[owner] += 1
        return real(fn, *args, **kw)

    monkeypatch.setattr(llama, "checkpoint_layer", counting)
    eng.train_ppo(PROMPTS, reward=length_reward)
    trainer = eng.last_trainer
    assert trainer.critic.gradient_checkpointing and trainer.critic.model.training  # the trunk, not only the wrapper
    n_layers = model.config.num_layers
    assert calls["actor"] > 0 and calls["critic"] == calls["actor"]
    assert calls["critic"] % n_layers == 0


def test_critic_from_a_reward_model_recomputes_as_the_policy_does(tmp_path):
    """ppo.critic_init = "reward": the critic copies the reward model's trunk and score head, and takes the
    policy's gradient checkpointing (a reward model is loaded without it), not the reward model's."""
    from rlhf_engine.trainer.reward_model import RewardModel

    rm = RewardModel(tiny_model()).eval().requires_grad_(False)
    assert not rm.model.gradient_checkpointing
    cfg = _cfg(tmp_path, ppo={"critic": "separate", "critic_init": "reward", "epochs": 1}, run={"steps": 1})
    model = tiny_model()
    model.gradient_checkpointing = True
    eng = Engine(cfg, model=model, tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=rm)
    critic = eng.last_trainer.critic
    assert critic.gradient_checkpointing and critic.model.training
    assert critic.model is not rm.model.model  # a copy: the reward model is not trained
    assert not rm.model.gradient_checkpointing and all(not p.requires_grad for p in rm.parameters())
    assert math.isfinite([h for h in summary["history"] if "loss/value" in h][0]["loss/value"])


def test_response_mean_reward_model_gets_the_response_mask(tmp_path):
    """A token reward with takes_response_mask (a "response_mean" reward model) is called with a (B, T) mask of
    exactly the response's tokens, and scores as the reward model does with that mask."""
    from rlhf_engine.trainer.reward_model import RewardModel

    rm = RewardModel(tiny_model(), pooling="response_mean").eval().requires_grad_(False)
    seen = []

    class Recording:
        takes_tokens = takes_response_mask = True

        def __call__(self, input_ids, attention_mask, response_mask):
            seen.append((input_ids, attention_mask, response_mask))
            return rm(input_ids, attention_mask, response_mask=response_mask)

    eng = Engine(_cfg(tmp_path, ppo={"epochs": 1}, run={"steps": 1}), model=tiny_model(), tokenizer=byte_tokenizer())
    eng.train_ppo(PROMPTS, reward=Recording())
    ids, attn, resp = seen[0]
    assert resp.shape == ids.shape and resp.sum() > 0
    # left-padded prompts end at column P - 1; every response starts at column P (at least one token, its EOS
    # or the first of max_new_tokens) and runs on exactly where the attention mask does
    P = int(resp.any(0).int().argmax())
    assert (resp.int().argmax(1) == P).all() and (attn[:, P - 1] == 1).all()
    assert not resp[:, :P].any() and torch.equal(resp[:, P:].bool(), attn[:, P:].bool())
    eng.config.run.overwrite = True  # a second run into the same output_dir
    summary = eng.train_ppo(PROMPTS[:4], reward=rm)  # the reward model itself, as reward.kind=model passes it
    assert all(math.isfinite(h["reward/mean"]) for h in summary["history"] if "reward/mean" in h)


@pytest.mark.parametrize("override, match", [
    ("optim.lr=-1", "optim.lr"), ("ppo.advantage=ppo2", "ppo.advantage"), ("run.device=tpu", "run.device"),
    ("ppo.minibatch_size=64", "ppo.minibatch_size"), ("ppo.advantage=grpo", "samples_per_prompt"),
    ("generation.top_p=0", "generation.top_p"), ("reward.kind=model", "reward.path"),
    ("ppo.advantage=rloo ppo.samples_per_prompt=2 ppo.adaptive_kl=true", "ppo.adaptive_kl"),
])
def test_bad_config_gives_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_dict({}, override.split())


def test_config_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-5\nppo:\n  clip_high: 0.28\nrun:\n  steps: 7\n")
    cfg = EngineConfig.from_file(path, ["run.seed=5"])
    assert (cfg.optim.lr, cfg.ppo.clip_high, cfg.run.steps, cfg.run.seed) == (3e-5, 0.28, 7, 5)
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr = 2e-5\n")
    assert EngineConfig.from_file(toml).optim.lr == 2e-5
    with pytest.raises(FileNotFoundError):
        EngineConfig.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown"):
        EngineConfig.from_dict({"optimizer": {}})


def test_empty_prompts_rejected(tmp_path):
    eng = Engine(_cfg(tmp_path), model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="prompts"):
        eng.train_ppo([], reward=length_reward)
    with pytest.raises(TypeError, match="reward"):
        eng.train_ppo(PROMPTS, reward=3)


def test_generation_logprobs_reused_when_parity_holds(tmp_path):
    cfg = _cfg(tmp_path, ppo={"logprob_parity_tol": 1e-4}, run={"steps": 2})
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    summary = eng.train_ppo(PROMPTS, reward=length_reward)
    first = [h for h in summary["history"] if "loss/policy" in h][0]
    assert first["logprob/gen_vs_train_max_abs"] <= 1e-5  # fp32 on the CPU
    assert eng.last_trainer.skip_old_logp
