"""Bad input gets a ValueError/TypeError that names the argument, before anything is lost: configs, optimizer
settings, rewards, prompts, tokenizers, and non-finite training steps of SFT and the reward model."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ppo_engine import PROMPTS, _cfg, length_reward  # noqa: E402
from tiny import byte_tokenizer, left_padded_prompts, tiny_model  # noqa: E402

from rlhf_engine import Engine, EngineConfig  # noqa: E402
from rlhf_engine.generation import generate  # noqa: E402
from rlhf_engine.model import CausalLM, preset  # noqa: E402
from rlhf_engine.trainer import reward_model as rm_mod  # noqa: E402
from rlhf_engine.trainer import sft as sft_mod  # noqa: E402
from rlhf_engine.trainer.checkpoint import latest_checkpoint  # noqa: E402
from rlhf_engine.trainer.optim import MasterWeightAdamW  # noqa: E402


@pytest.mark.parametrize("override, match", [
    ("optim.lr=.inf", "optim.lr: expected a finite number"), ("optim.lr=1e400", "optim.lr"),
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("ppo.kl_coef=.inf", "ppo.kl_coef"), ("generation.temperature=.nan", "generation.temperature"),
    ("optim.lr=null", "optim.lr: expected a value"), ("run.resume=null", "run.resume"),
    ("run.output_dir=", "run.output_dir"), ("run.seed=1.5", "run.seed"), ("run.seed=-1", "run.seed"),
    ("run.device=cuda:abc", "run.device"), ("run.device=cuda:-1", "run.device"),
    ("ppo.kl_horizon=2.5", "ppo.kl_horizon"), ("lora.target_modules=[1,2]", "lora.target_modules"),
    ("optim.betas=[0.9,a]", "optim.betas"),
])
def test_config_values_are_checked_by_name(override, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_dict({}, [override])


def test_config_takes_paths_and_numpy_scalars_and_names_bad_files(tmp_path):
    cfg = EngineConfig.from_dict({"run": {"output_dir": tmp_path / "x", "steps": np.int64(3)},
                                  "optim": {"lr": np.float64(2e-5)}})
    assert (cfg.run.output_dir, cfg.run.steps, cfg.optim.lr) == (str(tmp_path / "x"), 3, 2e-5)
    with pytest.raises(TypeError, match="overrides: expected a list"):
        EngineConfig.from_dict({}, "run.steps=3")
    for name, text in (("bad.yaml", "run: [steps: 3\n"), ("bad.toml", "[run\n"), ("bad.json", "{run:")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"config file {tmp_path / name}: cannot parse"):
            EngineConfig.from_file(tmp_path / name)


@pytest.mark.parametrize("kw, match", [({"lr": float("inf")}, "lr"), ({"eps": 0.0}, "eps"),
                                       ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9, 1.0)}, "betas")])
def test_optimizer_settings_that_would_corrupt_the_weights_raise(kw, match):
    kw = {"lr": 1e-3, **kw}
    with pytest.raises(ValueError, match=match):
        MasterWeightAdamW(tiny_model().parameters(), **kw)
    opt = MasterWeightAdamW(tiny_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="max_norm"):  # a negative max_norm would flip the gradient
        opt.clip_grad_norm_(-1.0)


@pytest.mark.parametrize("bad, exc", [({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, TypeError), ("good", TypeError),
                                      (None, TypeError), (1.0, TypeError), ([None] * 4, TypeError),
                                      (["1.0"] * 4, TypeError), ([1.0] * 3, ValueError)])
def test_a_reward_of_the_wrong_type_is_named(tmp_path, bad, exc):
    eng = Engine(_cfg(tmp_path, run={"steps": 1}), model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(exc, match="reward: expected"):
        eng.train_ppo(PROMPTS, reward=lambda p, r: bad)


def test_rewards_as_bools_or_generators_are_taken(tmp_path):
    eng = Engine(_cfg(tmp_path, run={"steps": 1}), model=tiny_model(), tokenizer=byte_tokenizer())
    eng.train_ppo(PROMPTS, reward=lambda p, r: (len(x) > 3 for x in r))


def test_a_frozen_policy_is_refused(tmp_path):
    eng = Engine(_cfg(tmp_path), model=tiny_model().requires_grad_(False), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="model: the policy has no trainable parameters"):
        eng.train_ppo(PROMPTS, reward=length_reward)


def test_prompts_are_checked_before_the_first_step(tmp_path):
    eng = Engine(_cfg(tmp_path), model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match=r"prompts\[8\]: '' encodes to no tokens"):
        eng.train_ppo(PROMPTS + [""], reward=length_reward)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None  # nothing ran
    with pytest.raises(TypeError, match=r"eval_prompts\[1\]"):
        eng.train_ppo(PROMPTS, reward=length_reward, eval_prompts=["ok", 3])
    with pytest.warns(UserWarning, match="1 of 8 are longer than generation.max_prompt_len = 16"):
        Engine(_cfg(tmp_path, run={"steps": 1}), model=tiny_model(), tokenizer=byte_tokenizer()).train_ppo(
            PROMPTS[:7] + ["x" * 40], reward=length_reward)


def test_a_tokenizer_larger_than_the_vocab_is_refused(tmp_path):
    model = CausalLM(preset("tiny-llama", vocab_size=100, attn_backend="torch"))
    eng = Engine(_cfg(tmp_path), model=model, tokenizer=byte_tokenizer())
    with pytest.raises(ValueError, match="tokenizer: it has 263 tokens but the model's vocab_size is 100"):
        eng.train_ppo(PROMPTS, reward=length_reward)


def test_generate_names_out_of_range_prompt_ids():
    model = tiny_model()
    ids, mask = left_padded_prompts(model.config.vocab_size)
    for bad in (model.config.vocab_size, -1):
        wrong = ids.clone()
        wrong[0, -1] = bad
        with pytest.raises(ValueError, match="prompt_ids: expected token ids in"):
            generate(model, wrong, mask, max_new_tokens=2)
    padded = ids.masked_fill(mask == 0, -7)  # padding is embedded too
    with pytest.raises(ValueError, match="padding included"):
        generate(model, padded, mask, max_new_tokens=2, greedy=True)


def _poison(module, name, monkeypatch, at=2):
    real, calls = getattr(module, name), []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        return (out[0] * float("nan"), *out[1:]) if len(calls) == at else out

    monkeypatch.setattr(module, name, poisoned)


def test_sft_skips_a_nonfinite_step(monkeypatch):
    tok = byte_tokenizer()
    rows = [{"prompt": f"Q{i}? ", "response": "A" * (2 + i % 3)} for i in range(8)]
    _poison(sft_mod, "sft_loss", monkeypatch)
    model = tiny_model()
    out = sft_mod.train_sft(model, tok, rows, epochs=1, batch_size=2, lr=1e-3, device="cpu", progress=False)
    assert out["skipped_steps"] == 1 and out["steps"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reward_model_training_skips_a_nonfinite_step(monkeypatch):
    tok = byte_tokenizer()
    pairs = [{"prompt": f"Q{i}? ", "chosen": "good" * (1 + i % 2), "rejected": "bad"} for i in range(8)]
    _poison(rm_mod, "pairwise_reward_loss", monkeypatch)
    out = rm_mod.train_reward_model(tiny_model(), tok, pairs, epochs=1, batch_size=2, lr=1e-3, eval_fraction=0.0,
                                    device="cpu", progress=False, group_by_prompt=False)
    assert out["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in out["reward_model"].parameters())


def _rl_inputs(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, v, lp, olp, adv = (torch.randn(B, T, generator=g) for _ in range(5))
    mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 1])[:, None]).float()
    return r, v, lp, olp, adv, mask


def test_nonfinite_values_at_masked_positions_stay_out_of_the_torch_reference():
    """The C++ and Triton kernels never read a masked position; the reference must not either (NaN * 0 is NaN)."""
    from rlhf_engine import algo

    r, v, lp, olp, adv, mask = _rl_inputs()
    clean = [algo.gae(r, v, mask, backend=b, lam=0.9) for b in ("torch", "cpp")]
    dirty = r.masked_fill(mask == 0, float("nan")), v.masked_fill(mask == 0, float("inf"))
    for b, (a0, g0) in zip(("torch", "cpp"), clean):
        a, g = algo.gae(*dirty, mask, backend=b, lam=0.9)
        torch.testing.assert_close(a, a0)
        torch.testing.assert_close(g, g0)
    adv_nan = adv.masked_fill(mask == 0, float("nan"))
    for b in ("torch", "cpp", "triton"):
        lp_g = lp.clone().requires_grad_()
        loss, _ = algo.ppo_loss(lp_g, olp, adv_nan, mask, values=v, old_values=v, returns=r, backend=b)
        loss.backward()
        assert torch.isfinite(lp_g.grad).all(), b  # 0 * NaN must not reach the gradient either
        loss0, _ = algo.ppo_loss(lp, olp, adv, mask, values=v, old_values=v, returns=r, backend=b)
        torch.testing.assert_close(loss, loss0)
    w = algo.masked_whiten(adv_nan, mask)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, algo.masked_whiten(adv, mask))


def test_a_nonzero_mask_value_means_valid_in_every_backend():
    from rlhf_engine import algo

    r, v, lp, olp, adv, mask = _rl_inputs()
    for scale in (2.0, 0.5):
        for b in ("torch", "cpp", "triton"):
            torch.testing.assert_close(algo.gae(r, v, mask * scale, backend=b)[0], algo.gae(r, v, mask, backend=b)[0])
            got = algo.ppo_loss(lp, olp, adv, mask * scale, ref_logp=olp, kl_coef=1.0, backend=b)[0]
            torch.testing.assert_close(got, algo.ppo_loss(lp, olp, adv, mask, ref_logp=olp, kl_coef=1.0,
                                                          backend="torch")[0])


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("count", [0, -2, float("nan"), torch.tensor(0.0)])
def test_loss_counts_must_be_positive(backend, count):
    from rlhf_engine import algo

    _, v, lp, olp, adv, mask = _rl_inputs()
    with pytest.raises(ValueError, match="num_tokens"):
        algo.ppo_loss(lp, olp, adv, mask, num_tokens=count, backend=backend)


def test_rl_helpers_name_mismatched_masks_and_take_empty_responses():
    from rlhf_engine import algo

    x, mask = torch.randn(4, 5), torch.ones(4, 5)
    for call in (lambda: algo.masked_whiten(x, torch.ones(5)), lambda: algo.masked_mean(x, torch.ones(4, 1)),
                 lambda: algo.aggregate(x, torch.ones(5)), lambda: algo.sequence_kl(x, torch.ones(5)),
                 lambda: algo.explained_variance(x, x[:, :1], mask),
                 lambda: algo.broadcast_to_tokens(x[:, 0], mask[0])):
        with pytest.raises(ValueError):
            call()
    z = torch.zeros(3, 0)
    a, g = algo.gae(z, z, z, backend="torch")
    assert a.shape == g.shape == (3, 0)
    assert algo.last_valid_index(z).tolist() == [-1, -1, -1]
    rewards, kl = algo.kl_penalized_rewards(torch.zeros(3), z, z, z, kl_coef=0.1)
    assert rewards.shape == kl.shape == (3, 0)


def test_kl_controllers_stay_finite_and_positive():
    from rlhf_engine import algo

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="kl_coef"):
            algo.FixedKLController(bad)
    ctl = algo.AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(0.0, n_steps=10_000)  # far more samples than the horizon: the factor is capped at 0.8
    assert ctl.value == pytest.approx(0.08)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, n_steps=-5)


def test_kernels_name_a_bad_scale_rope_table_or_integer_input():
    from rlhf_engine import kernels as K

    q = torch.randn(1, 5, 2, 8)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="softmax_scale"):
            K.flash_attention(q, q, q, softmax_scale=bad)
    kc, new = torch.zeros(2, 6, 1, 8), torch.randn(2, 2, 1, 8)
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"rope_positions: rows \[0, 5\)"):  # the table has 4 rows
            K.write_kv_cache(kc, kc.clone(), new, new, torch.tensor([0, 3]), cos=cos, sin=sin, backend=backend)
        with pytest.raises(ValueError, match="rope_positions"):
            K.write_kv_cache(kc, kc.clone(), new, new, torch.tensor([0, 1]), cos=cos, sin=sin,
                             rope_positions=torch.tensor([-1, 0]), backend=backend)
        with pytest.raises(TypeError, match="x: expected a floating-point"):
            K.apply_rope(torch.ones(1, 4, 2, 8, dtype=torch.long), cos, sin, backend=backend)


def test_a_corrupt_model_directory_is_named(tmp_path):
    from rlhf_engine.model.loading import load_pretrained, save_pretrained

    good = save_pretrained(tiny_model(), tmp_path / "m")
    load_pretrained(good)
    with pytest.raises(TypeError, match="dtype"):
        load_pretrained(good, dtype="float32")
    cfg_text = (good / "config.json").read_text()
    (good / "config.json").write_text("{hidden_size: ")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(good)
    (good / "config.json").write_text(cfg_text.replace('"hidden_size"', '"hidden_sz"'))
    with pytest.raises(ValueError, match="config.json: missing the key 'hidden_size'"):
        load_pretrained(good)
    (good / "config.json").write_text(cfg_text)
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_pretrained(good)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprob_kernels_name_out_of_range_targets(backend):
    from rlhf_engine import kernels as K

    logits, hidden, weight = torch.randn(6, 11), torch.randn(6, 4), torch.randn(11, 4)
    for bad in (11, -1):
        t = torch.tensor([0, 3, bad, 10, -100, 2])
        with pytest.raises(ValueError, match=f"targets: expected ids in \\[0, 11\\) or ignore_index=-100, got {bad}"):
            K.token_logprobs(logits, t, backend=backend)
        with pytest.raises(ValueError, match="targets: expected ids"):
            K.fused_linear_logprobs(hidden, weight, t, backend=backend)
    for bad in (float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature"):
            K.token_logprobs(logits, torch.zeros(6, dtype=torch.long), temperature=bad, backend=backend)
    K.token_logprobs(logits, torch.tensor([0, 3, 10, 10, -100, 2]), backend=backend)  # ignore_index is fine


@pytest.mark.parametrize("kw, exc", [({"max_new_tokens": 2.5}, ValueError), ({"top_k": -1}, ValueError),
                                     ({"top_k": 2.5}, ValueError), ({"temperature": float("inf")}, ValueError),
                                     ({"eos_token_ids": "2"}, TypeError), ({"pad_token_id": "0"}, TypeError),
                                     ({"check_every": 0}, ValueError)])
def test_generate_names_bad_arguments(kw, exc):
    model = tiny_model()
    ids, mask = left_padded_prompts(model.config.vocab_size)
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        generate(model, ids, mask, **{"max_new_tokens": 2, **kw})


@pytest.mark.parametrize("kw, match", [({"epochs": 1.5}, "epochs"), ({"batch_size": 0}, "batch_size"),
                                       ({"lr": "1e-3"}, "lr"), ({"max_grad_norm": -1.0}, "max_norm"),
                                       ({"weight_decay": -10.0}, "weight_decay"), ({"device": "gpu"}, "device")]
                         + ([({"device": "cuda"}, "CUDA is not available")] if not torch.cuda.is_available() else []))
def test_sft_names_bad_arguments(kw, match):
    rows = [{"prompt": "Q? ", "response": "A"}] * 2
    with pytest.raises(ValueError, match=match):
        sft_mod.train_sft(tiny_model(), byte_tokenizer(), rows, **{"lr": 1e-3, "progress": False, **kw})


def test_rl_function_arguments_are_named_on_every_backend(tmp_path):
    from rlhf_engine import algo

    r, v, lp, olp, adv, mask = _rl_inputs()
    for kw, exc, match in (({"vf_coef": float("nan")}, ValueError, "vf_coef"), ({"clip_low": "0.2"}, TypeError,
                                                                                   "clip_low")):
        with pytest.raises(exc, match=match):
            algo.ppo_loss(lp, olp, adv, mask, values=v, old_values=v, returns=r, backend="torch", **kw)
    with pytest.raises(TypeError, match="logp: expected a floating-point"):
        algo.ppo_loss(lp.long(), olp, adv, mask)
    with pytest.raises(TypeError, match="gamma"):
        algo.gae(r, v, mask, gamma="0.9")
    eng = Engine(_cfg(tmp_path), model=tiny_model(), tokenizer=byte_tokenizer())
    with pytest.raises(TypeError, match="prompts: expected a list of strings, got a dict"):
        eng.train_ppo({"a": 1, "b": 2}, reward=length_reward)


def test_argument_checks_trace_under_torch_compile():
    """The scalar checks step aside under torch.compile(fullgraph=True), where a Python scalar that varies
    between calls is symbolic and a branch on its value would break the graph."""
    from rlhf_engine import algo
    from rlhf_engine import kernels as K

    _, _, lp, olp, adv, mask = _rl_inputs()
    logits, tg, q = torch.randn(6, 11), torch.randint(0, 11, (6,)), torch.randn(1, 5, 2, 8)
    cases = [(lambda k: algo.ppo_loss(lp, olp, adv, mask, ref_logp=olp * 0, kl_coef=k, backend="torch")[0], (0.1, 0.2)),
             (lambda n: algo.ppo_loss(lp, olp, adv, mask, num_tokens=n, backend="triton")[0], (10, 11)),
             (lambda t: K.token_logprobs(logits, tg, temperature=t, backend="triton"), (0.7, 0.8)),
             (lambda s: K.flash_attention(q, q, q, softmax_scale=s, backend="torch"), (0.3, 0.4)),
             (lambda g: algo.gae(adv, adv, mask, gamma=g, backend="torch")[0], (0.9, 0.95))]
    for fn, args in cases:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        for a in args:
            torch.testing.assert_close(compiled(a), fn(a))


def test_numpy_scalars_and_one_element_tensors_are_numbers():
    from rlhf_engine import algo
    from rlhf_engine import kernels as K

    r, v, lp, olp, adv, mask = _rl_inputs()
    for b in ("torch", "cpp", "triton"):
        algo.ppo_loss(lp, olp, adv, mask, num_tokens=np.int64(10), backend=b)
    K.token_logprobs(torch.randn(6, 11), torch.zeros(6, dtype=torch.long), temperature=np.float32(0.7))
    algo.gae(r, v, mask, gamma=torch.tensor(0.99))
    MasterWeightAdamW(tiny_model().parameters(), lr=np.float32(1e-3))
    MasterWeightAdamW(tiny_model().parameters(), lr=torch.tensor(1e-3))
    model = tiny_model()
    ids, pm = left_padded_prompts(model.config.vocab_size)
    out = generate(model, ids, pm, max_new_tokens=np.int64(2), top_k=np.int64(5), temperature=np.float32(0.7),
                   eos_token_ids=torch.tensor([3, 4]), pad_token_id=np.int64(0))
    assert out.response_ids.shape[1] <= 2


def test_reward_clip_and_empty_hidden_are_named():
    from rlhf_engine import algo
    from rlhf_engine import kernels as K

    with pytest.raises(ValueError, match="clip"):
        algo.clip_rewards(torch.ones(3), float("nan"))
    with pytest.raises(ValueError, match="hidden size"):
        K.rms_norm(torch.ones(2, 0), torch.ones(0), 1e-6, backend="triton")
