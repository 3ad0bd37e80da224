"""The PPO trainer's rollout and update, checked value by value against the RL references."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from rlhf_engine import Engine, algo  # noqa: E402
from rlhf_engine.model.logprobs import sequence_logprobs  # noqa: E402
from rlhf_engine.trainer.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint  # noqa: E402
from rlhf_engine.trainer.optim import MasterWeightAdamW, lr_schedule  # noqa: E402
from rlhf_engine.trainer.ppo import PhaseTimer  # noqa: E402

PROMPTS = ["hello", "the movie", "abc", "x y z"]


def score_fn(prompts, responses):
    return [0.1 * len(r) - 0.3 for r in responses]


def _engine(tmp_path, model=None, **sections):
    cfg = {"generation": {"max_new_tokens": 7, "max_prompt_len": 16},
           "ppo": {"minibatch_size": 4, "micro_batch_size": 2, "epochs": 1, "kl_coef": 0.3, "lam": 0.9, "gamma": 0.97},
           "optim": {"lr": 1e-3},
           "run": {"steps": 1, "prompts_per_step": 4, "device": "cpu", "output_dir": str(tmp_path / "run"),
                   "progress": False, "tensorboard": False, "plot": False}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return Engine(cfg, model=model or tiny_model(), tokenizer=byte_tokenizer())


def test_rollout_matches_the_references(tmp_path):
    eng = _engine(tmp_path)
    trainer = eng.build_ppo_trainer(score_fn)
    ro, stats = trainer.make_rollout(PROMPTS, PhaseTimer(torch.device("cpu")))
    model = eng._model
    N = ro.response_ids.shape[1]
    P = ro.input_ids.shape[1] - N
    m = ro.response_mask.float()
    # old log-probs: the training forward's log-prob of each response token
    with torch.no_grad():
        expect_logp = sequence_logprobs(model, ro.input_ids, ro.attention_mask, start=P, response_mask=ro.response_mask)
    torch.testing.assert_close(ro.old_logp * m, expect_logp * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.ref_logp * m, expect_logp * m, atol=1e-5, rtol=0)  # reference == actor at start
    # rewards: -beta * k1 on every token + the score on the last valid token
    texts = trainer.sampler.decode_responses(ro.response_ids, ro.response_mask)
    scores = torch.tensor(score_fn(PROMPTS, texts))
    torch.testing.assert_close(ro.scores, scores)
    last = ro.response_mask.sum(1) - 1
    expect_r = -0.3 * (ro.old_logp - ro.ref_logp) * m
    expect_r[torch.arange(4), last] += scores
    torch.testing.assert_close(ro.rewards, expect_r, atol=1e-6, rtol=0)
    # advantages: whitened GAE of those rewards and the critic's values; returns before whitening
    adv, ret = algo.gae_reference(ro.rewards.double(), ro.values.double(), m.double(), gamma=0.97, lam=0.9)
    torch.testing.assert_close(ro.returns.double(), ret, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.advantages.double(), algo.masked_whiten(adv, m.double()), atol=1e-4, rtol=0)
    assert stats["reward/mean"].item() == pytest.approx(scores.mean().item(), rel=1e-6)


def test_first_minibatch_has_ratio_one(tmp_path):
    eng = _engine(tmp_path, ppo={"micro_batch_size": 4})
    summary = eng.train_ppo(PROMPTS, reward=score_fn)
    h = [h for h in summary["history"] if "loss/policy" in h][0]
    assert h["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert h["policy/clip_frac"] == 0.0


def test_lora_reference_equals_the_base_model(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model)
    eng = _engine(tmp_path, model=model, lora={"enabled": True, "rank": 4, "alpha": 8.0}, run={"steps": 2})
    eng.train_ppo(PROMPTS, reward=score_fn)
    trainer = eng.last_trainer
    ro, _ = trainer.make_rollout(PROMPTS, PhaseTimer(torch.device("cpu")))
    N = ro.response_ids.shape[1]
    with torch.no_grad():
        base_logp = sequence_logprobs(base, ro.input_ids, ro.attention_mask, start=ro.input_ids.shape[1] - N,
                                      response_mask=ro.response_mask)
    m = ro.response_mask.float()
    torch.testing.assert_close(ro.ref_logp * m, base_logp * m, atol=1e-5, rtol=0)
    assert ((ro.old_logp - ro.ref_logp).abs() * m).max() > 1e-4  # the adapters did change the policy


def test_nonfinite_gradient_skips_the_update(tmp_path):
    model = tiny_model()
    eng = _engine(tmp_path, model=model)
    trainer = eng.build_ppo_trainer(score_fn)
    before = copy.deepcopy(model.state_dict())
    head_before = trainer.value_head.weight.detach().clone()
    real = trainer._micro_batch_loss

    def poisoned(part, n_tok, n_seq):
        loss, metrics = real(part, n_tok, n_seq)
        return loss * float("nan"), metrics

    trainer._micro_batch_loss = poisoned
    out = trainer.train_step(PROMPTS)
    assert out["skipped/nonfinite_updates"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(trainer.value_head.weight, head_before)
    assert not trainer.optimizer.inner.state  # Adam never stepped


def test_nonfinite_logprob_skips_the_step_and_keeps_the_kl_coefficient(tmp_path):
    eng = _engine(tmp_path, ppo={"adaptive_kl": True, "kl_target": 1.0})
    trainer = eng.build_ppo_trainer(score_fn)
    with torch.no_grad():  # a reference that yields inf log-probs
        next(trainer.reference.parameters()).fill_(float("inf"))
    out = trainer.train_step(PROMPTS)
    assert out["skipped/nonfinite_reward"] == 1.0
    assert trainer.kl_ctl.value == 0.3
    ctl = algo.AdaptiveKLController(0.1, 1.0)
    ctl.update(float("nan"), 8)
    assert ctl.value == 0.1


def test_bf16_parameters_train_in_place_with_fp32_masters(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    eng = _engine(tmp_path, model=model, run={"steps": 2})
    eng.train_ppo(PROMPTS, reward=score_fn)
    opt = eng.last_trainer.optimizer
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}
    lowp = [(p, m) for p, m in zip(opt.params, opt.masters) if p.dtype == torch.bfloat16]
    assert lowp and all(m.dtype == torch.float32 for _, m in lowp)
    for p, m in lowp:
        assert torch.equal(p, m.to(torch.bfloat16))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for _, m in lowp)  # masters keep fp32 detail


def test_checkpoint_round_trip_and_pruning(tmp_path):
    state = {"a": 1.5, "nan": float("nan"), "t": (1, 2), 3: "int key", "x": torch.arange(5), "nested": [{"y": torch.ones(2)}]}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, models={"actor": {"w": torch.full((2,), float(step))}}, state=state)
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-000003"
    models, loaded, step = load_checkpoint(path)
    assert step == 3 and torch.equal(models["actor"]["w"], torch.full((2,), 3.0))
    assert loaded["a"] == 1.5 and math.isnan(loaded["nan"]) and loaded["t"] == (1, 2) and loaded[3] == "int key"
    assert torch.equal(loaded["x"], torch.arange(5)) and torch.equal(loaded["nested"][0]["y"], torch.ones(2))
    save_checkpoint(tmp_path, 3, models={"actor": {"w": torch.zeros(2)}}, state={})  # re-save the same step
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))[0]["actor"]["w"], torch.zeros(2))
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "step-000001")


def test_lr_schedule_values():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = MasterWeightAdamW([p], lr=1.0)
    sched = lr_schedule(opt, schedule="linear", warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.inner.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(opt, schedule="linaer", warmup_steps=0, total_steps=4)


def test_master_weights_accumulate_in_fp32():
    """bf16 parameters (CPU here; the GPU layout): micro-batch gradients sum in the fp32 master, not in bf16;
    the parameter keeps its storage across steps; a later optimizer over the same parameters takes over."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=True).to(torch.bfloat16)
    xs = [torch.randn(4, 16, dtype=torch.bfloat16) for _ in range(3)]
    opt = MasterWeightAdamW(lin.parameters(), lr=1e-2)
    ptr = lin.weight.data_ptr()
    for x in xs:                                          # three micro-batches, accumulated
        (lin(x).float().square().sum() * 1e-3).backward()
    assert lin.weight.grad is None and lin.bias.grad is None   # moved to the masters, none kept in bf16
    w_master = opt.masters[0]
    assert w_master.grad.dtype == torch.float32
    want = sum(torch.autograd.grad((lin(x).float().square().sum() * 1e-3), lin.weight)[0].float() for x in xs)
    torch.testing.assert_close(w_master.grad, want, rtol=0, atol=0)    # each bf16 grad, summed exactly in fp32
    norm = opt.clip_grad_norm_(1e-4)
    assert norm.dtype == torch.float32 and norm > 1e-4
    torch.testing.assert_close(torch.linalg.vector_norm(torch.stack([m.grad.norm() for m in opt.masters])),
                               torch.tensor(1e-4), rtol=1e-3, atol=0)
    before = lin.weight.detach().clone()
    opt.step()
    assert lin.weight.data_ptr() == ptr and not torch.equal(lin.weight, before)
    torch.testing.assert_close(lin.weight.float(), w_master.detach().bfloat16().float())
    opt.zero_grad()
    assert all(m.grad is None for m in opt.masters)
    opt2 = MasterWeightAdamW(lin.parameters(), lr=1e-2)  # e.g. PPO after SFT: the new masters get the grads
    lin(xs[0]).float().sum().backward()
    assert opt2.masters[0].grad is not None and opt.masters[0].grad is None


def test_master_weights_released_at_the_end_of_a_run():
    """release() frees the masters and moments (a reward model trained with them scores PPO rollouts without
    them); the parameters keep their values and a new optimizer over them starts from those."""
    import gc
    import weakref

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt = MasterWeightAdamW(lin.parameters(), lr=1e-2)
    lin(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    trained = lin.weight.detach().clone()
    master = weakref.ref(opt.masters[0])
    opt.release()
    gc.collect()
    assert master() is None  # nothing holds the fp32 master any more
    assert not hasattr(lin.weight, "_rlhf_master") and not opt.inner.state and not opt.param_groups
    assert torch.equal(lin.weight, trained)
    lin(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert lin.weight.grad is not None  # no master: the hook leaves the gradient where autograd put it
    opt2 = MasterWeightAdamW(lin.parameters(), lr=1e-2)
    assert torch.equal(opt2.masters[0].bfloat16(), trained)


def test_sft_and_reward_training_release_their_masters():
    """bf16 models after train_sft / train_reward_model carry no fp32 masters."""
    from rlhf_engine.trainer.reward_model import train_reward_model
    from rlhf_engine.trainer.sft import train_sft

    tok = byte_tokenizer()
    model = tiny_model().to(torch.bfloat16)
    train_sft(model, tok, [{"prompt": "ab", "response": "cd"}] * 2, batch_size=2, max_len=16, progress=False)
    assert not any(hasattr(p, "_rlhf_master") for p in model.parameters())
    pairs = [{"prompt": "ab", "chosen": "good", "rejected": "bad"}] * 4
    rm = train_reward_model(tiny_model().to(torch.bfloat16), tok, pairs, eval_fraction=0.0, batch_size=2,
                            max_len=16, progress=False)["reward_model"]
    assert next(rm.parameters()).dtype == torch.bfloat16
    assert not any(hasattr(p, "_rlhf_master") for p in rm.parameters())


def test_bad_ppo_inputs(tmp_path):
    eng = _engine(tmp_path)
    with pytest.raises(TypeError, match="prompts"):
        eng.train_ppo("a single prompt", reward=score_fn)
    with pytest.raises(ValueError, match="lora.dropout"):
        _engine(tmp_path, lora={"enabled": True, "dropout": 0.1}).train_ppo(PROMPTS, reward=score_fn)
    with pytest.raises(ValueError, match="float16"):
        _engine(tmp_path, model=tiny_model().half()).train_ppo(PROMPTS, reward=score_fn)
    with pytest.raises(TypeError, match="optim.lr"):
        Engine({"optim": {"lr": True}})


@pytest.mark.parametrize("agg", algo.AGG_MODES)
def test_logged_entropy_is_a_token_mean_whatever_the_aggregation(tmp_path, agg):
    """``policy/entropy`` is the mean entropy of a response token under every ``ppo.agg`` (the loss's own entropy
    term is a per-sequence sum under the token-sum modes), and it adds up over micro-batches. Responses of
    different lengths (a likelier EOS), so that no aggregation equals the token mean by accident."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head_weight[2].mul_(50.0)  # EOS (id 2)
    eng = _engine(tmp_path, model=model, ppo={"agg": agg})
    trainer = eng.build_ppo_trainer(score_fn)
    ro, _ = trainer.make_rollout(PROMPTS, PhaseTimer(torch.device("cpu")))
    assert len(set(ro.response_mask.sum(1).tolist())) > 1
    N = ro.response_ids.shape[1]
    with torch.no_grad():
        logits = eng._model(ro.input_ids, attention_mask=ro.attention_mask).float()[:, -N - 1:-1]
    logp = torch.log_softmax(logits.double(), -1)  # temperature 1.0
    m = ro.response_mask.double()
    expect = (-(logp.exp() * logp).sum(-1) * m).sum() / m.sum()
    num_tokens, num_seqs = m.sum().float(), (m.sum(1) > 0).sum().float()
    halves = [trainer._micro_batch_loss(ro.select(torch.arange(i, i + 2)), num_tokens, num_seqs)[1]["entropy"]
              for i in (0, 2)]
    assert sum(halves).item() == pytest.approx(expect.item(), rel=1e-5)
