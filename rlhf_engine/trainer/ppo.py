"""The PPO trainer: rollout on the generation engine, scoring, advantages, and K epochs of
minibatch updates, with checkpoint/resume and per-step metrics.

The actor's parameters serve both generation and training (no copy between an inference
engine and a trainer). One host sync per phase at most: metrics stay tensors until the end of
the step, and the only mid-step syncs are the finiteness checks that guard the weights.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from rlhf_engine import algo
from rlhf_engine.config import EngineConfig
from rlhf_engine.model.lora import disable_adapters, lora_parameters
from rlhf_engine.rewards import as_score_tensor

from .actor_critic import ValueHead, critic_forward, policy_forward
from .checkpoint import clear_run, latest_checkpoint, load_checkpoint, prune_checkpoints, resume_point, save_checkpoint
from .logging import MetricsLogger, plot_curves
from .optim import MasterWeightAdamW, lr_schedule
from .resume import check_resumable, rewind, rewind_point, weights_fingerprint
from .rollout import PromptSampler, Rollout, pad_rollout
from .sampler import PolicySampler


class PhaseTimer:
    """Wall time and peak memory per phase (CUDA: peak allocated; CPU: process peak RSS). Each phase is also a
    ``torch.profiler.record_function`` range named ``phase/<name>``, so that a profile of a step can attribute
    its kernels' device time to the phases (``benchmarks/bench_ppo_step.py`` does)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.metrics: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                    torch.cuda.reset_peak_memory_stats(timer.device)
                self.t0 = time.perf_counter()
                self.range = torch.profiler.record_function(f"phase/{name}")
                self.range.__enter__()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":  # inside the range: every kernel of the phase ends within it
                    torch.cuda.synchronize(timer.device)
                self.range.__exit__(*exc)
                if timer.device.type == "cuda":
                    timer.metrics[f"mem/{name}_peak_mb"] = torch.cuda.max_memory_allocated(timer.device) / 2**20
                timer.metrics[f"time/{name}_s"] = time.perf_counter() - self.t0
                return False

        return _Phase()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PPOTrainer:
    """Runs PPO for an actor ``CausalLM`` against a reward.

    Args:
        cfg: the engine configuration (``ppo``, ``optim``, ``generation``, ``run`` sections are used).
        actor: the policy (a CausalLM, trainable; LoRA adapters already applied when ``cfg.lora.enabled``).
        tokenizer: encodes prompts and decodes responses (``encode``, ``decode``, ``eos_token_id``).
        reward: a text or token reward (see ``rlhf_engine.rewards``).
        critic: for ``ppo.critic == "separate"``, the critic (a ScalarModel, see
            ``actor_critic.separate_critic``); None otherwise.
        device: where everything runs.
    """

    def __init__(self, cfg: EngineConfig, actor, tokenizer, reward, *, critic=None,
                 device: torch.device | str = "cpu"):
        self.cfg, self.actor, self.tok, self.reward = cfg, actor, tokenizer, reward
        self.device = torch.device(device)
        pc = cfg.ppo
        self.lora = bool(lora_parameters(actor))
        # Reference: the same weights with adapters off (LoRA), or a frozen copy.
        if self.lora:
            self.reference = None
        else:
            self.reference = copy.deepcopy(actor).eval()
            self.reference.requires_grad_(False)
        self.reference_fingerprint = weights_fingerprint(actor if self.lora else self.reference, base_only=True)
        hidden = actor.config.hidden_size
        self.value_head = None
        self.critic = None
        if pc.uses_critic:
            if pc.critic == "shared":
                self.value_head = ValueHead(hidden, device=self.device)
            else:
                if critic is None:
                    raise ValueError("critic: required when ppo.critic is 'separate'")
                self.critic = critic
        actor_params = (lora_parameters(actor) if self.lora else [p for p in actor.parameters() if p.requires_grad])
        if not any(p.requires_grad for p in actor_params):  # the value head alone would "train" a frozen policy
            raise ValueError("model: the policy has no trainable parameters (requires_grad is False everywhere); "
                             "call model.requires_grad_(True), or enable lora")
        if self.value_head is not None:
            actor_params = actor_params + list(self.value_head.parameters())
        oc = cfg.optim
        self.optimizer = MasterWeightAdamW(actor_params, lr=oc.lr, betas=oc.betas, eps=oc.eps,
                                           weight_decay=oc.weight_decay)
        self.critic_optimizer = None
        if self.critic is not None:
            self.critic_optimizer = MasterWeightAdamW(self.critic.parameters(), lr=oc.critic_lr or oc.lr,
                                                      betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay)
        rollout_size = cfg.run.prompts_per_step * pc.samples_per_prompt
        updates_per_step = pc.epochs * -(-rollout_size // pc.minibatch_size)
        total = max(1, cfg.run.steps * updates_per_step)
        self.schedulers = [lr_schedule(o, schedule=oc.schedule, warmup_steps=oc.warmup_steps, total_steps=total)
                           for o in (self.optimizer, self.critic_optimizer) if o is not None]
        self.kl_ctl = (algo.AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon) if pc.adaptive_kl
                       else algo.FixedKLController(pc.kl_coef))
        self.score_moments = algo.RunningMoments()
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.run.seed)
        self.step_idx = 0
        self.skip_old_logp = False  # set once generation/training log-prob parity is verified
        self.weights_touched = False  # an optimizer step of the current PPO step has run (train())
        self.sampler = PolicySampler(actor, tokenizer, cfg.generation, self.device, self.gen)
        self.eos_ids = self.sampler.eos_ids
        self.eos_tensor = torch.tensor(self.eos_ids, device=self.device)
        self.train_graphs = self.make_train_graphs() if pc.train_cuda_graph else None

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, prompts: list[str], gen) -> torch.Tensor:
        """(B,) fp32 rewards for generated responses (text or token reward)."""
        B = gen.response_ids.shape[0]
        if getattr(self.reward, "takes_tokens", False):
            kw = {}
            if getattr(self.reward, "takes_response_mask", False):  # (B, T): the response's tokens
                kw["response_mask"] = F.pad(gen.response_mask, (gen.prompt_len, 0))
            scores = self.reward(gen.sequences, gen.attention_mask, **kw)
        else:
            scores = self.reward(prompts, self.sampler.decode_responses(gen.response_ids, gen.response_mask))
        return as_score_tensor(scores, B, self.device)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def make_rollout(self, prompts: list[str], timer: PhaseTimer) -> tuple[Rollout | None, dict]:
        pc, gc = self.cfg.ppo, self.cfg.generation
        prompts = [p for p in prompts for _ in range(pc.samples_per_prompt)]
        prompt_ids, prompt_mask = self.sampler.encode_prompts(prompts)
        with timer("generate"):
            gen = self.sampler.generate(prompt_ids, prompt_mask)
        seq, attn, resp, rmask = gen.sequences, gen.attention_mask, gen.response_ids, gen.response_mask
        N = resp.shape[1]
        with timer("score"):
            scores = self.score(prompts, gen)
            stats = {}
            self.actor.eval()
            if self.critic is not None:
                self.critic.eval()
            shared_values = pc.uses_critic and self.value_head is not None
            values = last_value = None
            if self.skip_old_logp and not shared_values:
                old = {"logp": gen.logprobs.float() * rmask}
            else:  # one trunk pass gives the old log-probs and, for a shared critic, the values
                old = policy_forward(self.actor, seq, attn, resp, rmask, temperature=gc.temperature,
                                     value_head=self.value_head if shared_values else None,
                                     with_bootstrap_value=shared_values and pc.bootstrap_truncated,
                                     with_logp=not self.skip_old_logp)
                if shared_values:
                    values, last_value = old["values"] * rmask, old.get("last_value")
                if pc.logprob_parity_tol is not None and not self.skip_old_logp and self.step_idx == 0:
                    diff = ((old["logp"] - gen.logprobs.float()).abs() * rmask).max().item()
                    stats["logprob/gen_vs_train_max_abs"] = diff
                    self.skip_old_logp = diff <= pc.logprob_parity_tol
                if self.skip_old_logp:
                    old["logp"] = gen.logprobs.float() * rmask
            ref_ctx = disable_adapters(self.actor) if self.lora else nullcontext()
            with ref_ctx:
                ref_model = self.actor if self.lora else self.reference
                ref = policy_forward(ref_model, seq, attn, resp, rmask, temperature=gc.temperature)
            if self.critic is not None:
                v = critic_forward(self.critic, seq, attn, N, with_bootstrap_value=pc.bootstrap_truncated)
                values, last_value = v["values"] * rmask, v.get("last_value")
            finite = torch.isfinite(scores).all() & torch.isfinite(old["logp"]).all() & torch.isfinite(ref["logp"]).all()
            if values is not None:
                finite = finite & torch.isfinite(values).all()
            if not bool(finite):  # one sync: a NaN/inf reward or log-prob must not reach the weights
                return None, {"skipped/nonfinite_reward": 1.0}
        with timer("advantage"):
            raw_scores = scores
            if pc.normalize_rewards:
                self.score_moments.update(scores)
                scores = self.score_moments.normalize(scores)
            old_logp, ref_logp = old["logp"], ref["logp"]
            mask = rmask.float()
            last_tok = resp.gather(1, (rmask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)  # (B,)
            ended = torch.isin(last_tok, self.eos_tensor) & (rmask.sum(1) > 0)  # finished with EOS
            if pc.advantage in ("gae", "reinforce_pp"):
                rewards, kl = algo.kl_penalized_rewards(scores, old_logp, ref_logp, mask, kl_coef=self.kl_ctl.value,
                                                        kind=pc.kl_kind, reward_clip=pc.reward_clip)
            else:
                kl = algo.kl_estimate(old_logp, ref_logp, kind=pc.kl_kind) * mask
                rewards = torch.zeros_like(mask)
            if pc.advantage == "gae":
                boot = None
                if pc.bootstrap_truncated:
                    boot = last_value * (~ended).float()
                adv, ret = algo.gae(rewards, values, mask, gamma=pc.gamma, lam=pc.lam, mask_mode=pc.mask_mode,
                                    last_value=boot)
                if pc.whiten_advantages:
                    adv = algo.masked_whiten(adv, mask)
            elif pc.advantage == "reinforce_pp":
                adv, ret = algo.reinforce_pp_advantages(rewards, mask, gamma=pc.gamma, whiten=pc.whiten_advantages)
            elif pc.advantage == "reinforce_pp_baseline":
                kl_rewards = -self.kl_ctl.value * kl
                adv, ret = algo.reinforce_pp_baseline_advantages(
                    algo.clip_rewards(scores, pc.reward_clip), kl_rewards, mask, pc.samples_per_prompt,
                    gamma=pc.gamma, whiten=pc.whiten_advantages)
                rewards = kl_rewards
            else:
                estimator = {"grpo": algo.grpo_advantages, "dr_grpo": algo.dr_grpo_advantages,
                             "rloo": algo.rloo_advantages}[pc.advantage]
                seq_adv = estimator(algo.clip_rewards(scores, pc.reward_clip), pc.samples_per_prompt)
                adv = algo.broadcast_to_tokens(seq_adv, mask)
                ret = adv
        rollout = Rollout(input_ids=seq, attention_mask=attn, response_ids=resp, response_mask=rmask,
                          old_logp=old_logp, ref_logp=ref_logp, kl=kl, rewards=rewards, advantages=adv,
                          returns=ret, scores=raw_scores, values=values)
        lengths = mask.sum(1)
        std = raw_scores.std() if raw_scores.numel() > 1 else torch.zeros((), device=raw_scores.device)
        stats_t = {
            "reward/mean": raw_scores.mean(), "reward/std": std, "kl/mean": algo.sequence_kl(kl, mask),
            "response/length_mean": lengths.mean(), "response/eos_fraction": ended.float().mean(),
        }
        if values is not None:
            stats_t["critic/explained_variance"] = algo.explained_variance(values, ret, mask)
            stats_t["critic/value_mean"] = algo.masked_mean(values, mask)
        stats.update(stats_t)
        stats["tokens/generated"] = lengths.sum()
        return rollout, stats

    # ------------------------------------------------------------------ update
    def _optimizers(self):
        return [o for o in (self.optimizer, self.critic_optimizer) if o is not None]

    def update(self, ro: Rollout) -> dict:
        """``ppo.epochs`` passes over the rollout in shuffled minibatches of micro-batches."""
        pc = self.cfg.ppo
        B = ro.batch_size
        self.actor.train()
        if self.critic is not None:  # a loaded model comes in eval mode, where layers are never recomputed
            self.critic.train()
        sums: dict[str, torch.Tensor] = {}
        n_updates, n_skipped = 0, 0
        grad_norm = torch.zeros((), device=self.device)
        graphs = self.train_graphs  # CUDA-graph replays of the micro-batches (opt-in): gradients zeroed in place
        if graphs is not None:
            graphs.begin_update(consts=self._graph_consts())
            if pc.train_cuda_graph_pad > 1:  # masked columns: widths that recur across steps, the same loss
                gc = self.cfg.generation
                ro = pad_rollout(ro, pc.train_cuda_graph_pad, self.sampler.pad_id, max_prompt=gc.max_prompt_len,
                                 max_response=gc.max_new_tokens)
        drop = graphs is None
        for _ in range(pc.epochs):
            order = torch.randperm(B, generator=self.gen, device=self.device)
            for mb_start in range(0, B, pc.minibatch_size):
                mb = order[mb_start:mb_start + pc.minibatch_size]
                mb_mask = ro.response_mask[mb].float()
                num_tokens = mb_mask.sum().clamp(min=1)  # global normalizers of this minibatch
                num_seqs = (mb_mask.sum(1) > 0).sum().clamp(min=1).float()
                for o in self._optimizers():
                    o.zero_grad(set_to_none=drop)
                for mc_start in range(0, mb.numel(), pc.micro_batch_size):
                    part = ro.select(mb[mc_start:mc_start + pc.micro_batch_size])
                    if graphs is not None:
                        metrics = graphs.run(part, num_tokens, num_seqs)
                    else:
                        loss, metrics = self._micro_batch_loss(part, num_tokens, num_seqs)
                        loss.backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                norms = [o.clip_grad_norm_(self.cfg.optim.grad_clip) for o in self._optimizers()]
                total_norm = torch.stack([n.float() for n in norms]).norm()
                if not bool(torch.isfinite(total_norm)):  # one sync per optimizer step guards the weights
                    for o in self._optimizers():
                        o.zero_grad(set_to_none=drop)
                    n_skipped += 1
                    continue
                self.weights_touched = True  # from here a failure leaves this step's weights half made
                for o in self._optimizers():
                    o.step()
                for s in self.schedulers:
                    s.step()
                grad_norm = grad_norm + total_norm
                n_updates += 1
        n_mb = pc.epochs * -(-B // pc.minibatch_size)
        names = {"pg_loss": "loss/policy", "vf_loss": "loss/value", "entropy": "policy/entropy",
                 "clip_frac": "policy/clip_frac", "approx_kl": "policy/approx_kl", "vf_clip_frac": "critic/clip_frac",
                 "kl": "policy/kl_loss_term"}
        out = {names[k]: v / n_mb for k, v in sums.items()}
        out["optim/grad_norm"] = grad_norm / max(1, n_updates)
        out["optim/lr"] = self.schedulers[0].get_last_lr()[0]
        out["skipped/nonfinite_updates"] = float(n_skipped)
        out["optim/updates"] = float(n_updates)
        for o in self._optimizers():
            o.zero_grad(set_to_none=drop)
        return out

    def make_train_graphs(self, **kw):
        """The CUDA-graph runner of this trainer's micro-batches (``ppo.train_cuda_graph``; ``train_graph.py``)."""
        from .train_graph import TrainGraphs

        params = [p for o in self._optimizers() for p in o.params]
        return TrainGraphs(self._micro_batch_loss, params, watched=self._trained_tensors, device=self.device, **kw)

    def _trained_models(self) -> list:
        return [m for m in (self.actor, self.critic, self.value_head) if m is not None]

    def _trained_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the models a micro-batch's loss runs (frozen ones too): a CUDA graph of it
        reads them by address (``train_graph.py``)."""
        return [t for m in self._trained_models() for t in (*m.parameters(), *m.buffers())]

    def _graph_consts(self) -> tuple:
        """What a captured micro-batch bakes in besides its inputs' shapes: the loss's settings, and the model state
        that picks its code path (recomputation, the one-node layer, hooks and LoRA adapters' switches)."""
        from rlhf_engine.model import fused_layer
        from rlhf_engine.model.packing import global_hooks

        state = []
        for model in self._trained_models():
            state.append(bool(getattr(model, "gradient_checkpointing", False)))
            for m in model.modules():
                hooked = fused_layer._hooked(m)
                enabled = getattr(m, "adapters_enabled", None)
                if hooked or enabled is not None:
                    state.append((id(m), hooked, enabled))
        return (dataclasses.astuple(self.cfg.ppo), self.cfg.generation.temperature, self.cfg.generation.max_new_tokens,
                fused_layer.enabled(), global_hooks(backward=True), tuple(state))

    def _micro_batch_loss(self, part: Rollout, num_tokens, num_seqs):
        pc, gc = self.cfg.ppo, self.cfg.generation
        N = part.response_ids.shape[1]
        with_entropy = True  # reported every step; the fused kernel computes it in the same pass
        fwd = policy_forward(self.actor, part.input_ids, part.attention_mask, part.response_ids, part.response_mask,
                             temperature=gc.temperature, with_entropy=with_entropy, value_head=self.value_head)
        values = fwd.get("values")
        if self.critic is not None:
            values = critic_forward(self.critic, part.input_ids, part.attention_mask, N)["values"]
        critic_args = {}
        if values is not None:
            critic_args = dict(values=values, old_values=part.values, returns=part.returns)
        entropy = fwd["entropy"] if pc.ent_coef > 0 else fwd["entropy"].detach()
        loss, metrics = algo.ppo_loss(
            fwd["logp"], part.old_logp, part.advantages, part.response_mask.float(), **critic_args,
            ref_logp=part.ref_logp if pc.kl_loss_coef > 0 else None, entropy=entropy,
            clip_low=pc.clip_low, clip_high=pc.clip_high, dual_clip=pc.dual_clip, value_clip=pc.value_clip,
            vf_coef=pc.vf_coef, ent_coef=pc.ent_coef, kl_coef=pc.kl_loss_coef, kl_kind=pc.kl_loss_kind,
            agg=pc.agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=gc.max_new_tokens, backend="auto")
        # the loss's "entropy" is its aggregated bonus term (a per-sequence sum under the token-sum modes); the log
        # reports the mean entropy of a token, whatever ppo.agg is (it adds up over micro-batches as the others do)
        metrics = dict(metrics)
        metrics["entropy"] = algo.masked_sum(fwd["entropy"].detach().float(), part.response_mask) / num_tokens
        return loss, metrics

    # ------------------------------------------------------------------ one step
    def train_step(self, prompts: list[str]) -> dict:
        """Rollout + update for one batch of prompts. Returns the step's metrics as Python floats."""
        if self.device.type == "cuda":  # Triton launches on the current device: make it the trainer's (cuda:N)
            with torch.cuda.device(self.device):
                return self._train_step(prompts)
        return self._train_step(prompts)

    def _train_step(self, prompts: list[str]) -> dict:
        timer = PhaseTimer(self.device)
        t0 = time.perf_counter()
        ro, stats = self.make_rollout(prompts, timer)
        if ro is not None:
            with timer("train"):
                stats.update(self.update(ro))
        kl_coef_used = self.kl_ctl.value if self.cfg.ppo.kl_in_reward else 0.0  # the beta the rewards carried
        self.step_idx += 1
        elapsed = time.perf_counter() - t0
        keys = list(stats)
        vals = [stats[k] for k in keys]
        tensor_idx = [i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)]
        if tensor_idx:  # the one host sync of the step's metrics
            synced = torch.stack([vals[i].detach().float().reshape(()).to(self.device)
                                  for i in tensor_idx]).cpu().tolist()  # stacked on the device: one copy
            for i, v in zip(tensor_idx, synced):
                vals[i] = v
        out = dict(zip(keys, vals))
        if ro is not None and self.cfg.ppo.kl_in_reward:
            self.kl_ctl.update(out["kl/mean"], n_steps=ro.batch_size)
        out["kl/coef"] = kl_coef_used
        out.update(timer.metrics)
        out["time/step_s"] = elapsed
        out["throughput/tokens_per_s"] = out.get("tokens/generated", 0.0) / elapsed
        if self.device.type != "cuda":
            out["mem/peak_rss_mb"] = _peak_rss_mb()
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, prompts: list[str], samples: int = 1, *, reward=None) -> tuple[float, list[tuple[str, str, float]]]:
        """Mean reward of sampled continuations of ``prompts`` (``samples`` each), with the samples.
        ``reward`` scores them instead of the training reward when given (e.g. VADER for a RM run).

        Uses its own generator (seeded from run.seed) so that evaluation does not shift the
        training RNG stream and before/after numbers use the same random draws.
        """
        if not prompts:
            return float("nan"), []
        saved = self.sampler.gen
        self.sampler.gen = torch.Generator(device=self.device).manual_seed(self.cfg.run.seed + 12345)
        try:
            rep = [p for p in prompts for _ in range(samples)]
            texts, gen = self.sampler.sample_texts(rep)
            saved_reward, self.reward = self.reward, (reward or self.reward)
            try:
                scores = self.score(rep, gen)
            finally:
                self.reward = saved_reward
        finally:
            self.sampler.gen = saved
        return float(scores.mean()), list(zip(rep, texts, scores.tolist()))

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.lora:
            actor = {n: p for n, p in self.actor.named_parameters() if "lora_" in n}
        else:
            actor = dict(self.actor.state_dict())
        if self.value_head is not None:
            actor.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        models = {"actor": actor}
        if self.critic is not None:
            models["critic"] = dict(self.critic.state_dict())
        return models

    def save(self, root, sampler: PromptSampler, history: list[dict]):
        state = {
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": None if self.critic_optimizer is None else self.critic_optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
            "gen_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "sampler": sampler.state_dict(), "skip_old_logp": self.skip_old_logp, "history": history,
            "config": self.cfg.to_dict(), "reference_fingerprint": self.reference_fingerprint,
        }
        return save_checkpoint(root, self.step_idx, models=self.trainable_state(), state=state)

    def load(self, path, sampler: PromptSampler) -> list[dict]:
        models, state, step = load_checkpoint(path)
        check_resumable(self.cfg, self.reference_fingerprint, path, state)  # before anything is overwritten
        actor_sd = {k: v for k, v in models["actor"].items() if not k.startswith("value_head.")}
        with torch.no_grad():
            if self.lora:
                params = dict(self.actor.named_parameters())
                for k, v in actor_sd.items():
                    params[k].copy_(v)
            else:
                self.actor.load_state_dict(actor_sd)
            if self.value_head is not None:
                self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in models["actor"].items()
                                                 if k.startswith("value_head.")})
            if self.critic is not None:
                self.critic.load_state_dict(models["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.gen.set_state(state["gen_rng"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        sampler.load_state_dict(state["sampler"])
        self.skip_old_logp = bool(state["skip_old_logp"])
        self.step_idx = step
        return list(state["history"])

    # ------------------------------------------------------------------ the loop
    def train(self, prompts: list[str], eval_prompts: list[str] | None = None) -> dict:
        """Run ``run.steps`` PPO steps. Returns a summary (history, eval before/after, paths)."""
        rc = self.cfg.run
        from pathlib import Path

        out_dir = Path(rc.output_dir)
        ckpt_root = out_dir / "checkpoints"
        self.sampler.check_prompts(prompts, "prompts")  # every prompt now, not when its batch comes up
        if eval_prompts:
            self.sampler.check_prompts(list(eval_prompts), "eval_prompts")
        sampler = PromptSampler(prompts, rc.prompts_per_step, rc.seed)
        history: list[dict] = []
        start = resume_point(ckpt_root) if rc.resume else None
        if start is not None:
            history = self.load(start, sampler)
        else:  # a fresh run: never into an earlier run's checkpoints (unless run.overwrite clears them)
            clear_run(out_dir, overwrite=rc.overwrite or rc.resume)
        # metrics.jsonl restarts from the checkpoint's records (none for a fresh run), so steps logged after the
        # last checkpoint by an interrupted run do not appear twice.
        logger = MetricsLogger(out_dir, tensorboard=rc.tensorboard, stdout=not rc.progress, history=history)
        summary: dict = {"output_dir": str(out_dir)}
        eval_prompts = list(eval_prompts or [])
        if eval_prompts and self.step_idx == 0:
            before, samples = self.evaluate(eval_prompts, rc.eval_samples)
            summary["eval_before"], summary["samples_before"] = before, samples
            logger.log(0, {"eval/reward": before})
            history.append({"step": 0, "eval/reward": before})
        bar = None
        if rc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rc.steps, initial=self.step_idx, desc="PPO", unit="step", dynamic_ncols=True)
        saved_step, first_new = self.step_idx, len(history)
        step_at_start, before_step, recorded = self.step_idx, None, True
        try:
            while self.step_idx < rc.steps:
                step_at_start, before_step = self.step_idx, rewind_point(self, sampler)
                self.weights_touched, recorded = False, False
                metrics = self.train_step(sampler.next_batch())
                history.append({"step": self.step_idx, **metrics})
                recorded = True  # the step is complete: weights, counter, KL coefficient, history
                logger.log(self.step_idx, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                    kl=f"{metrics.get('kl/mean', float('nan')):.3f}")
                if rc.checkpoint_every and self.step_idx % rc.checkpoint_every == 0:
                    self.save(ckpt_root, sampler, history)
                    prune_checkpoints(ckpt_root, rc.keep_checkpoints)
                    saved_step = self.step_idx
        except BaseException:
            # A step that raised before its first optimizer step (a reward function's exception, Ctrl-C in
            # generation) left the weights as the last completed step made them: checkpoint that step, with the
            # failed step's counter, prompts, random states, score statistics and KL coefficient as they were, so
            # that run.resume=true continues as an uninterrupted run would. An error once a step is complete (in
            # the history: logging, the periodic save) checkpoints that step as it is. A step that raised after
            # changing weights, before it was complete (even in its metrics' sync), saves nothing: its weights are
            # neither the last step's nor, with the rest of its state, its own.
            if recorded:
                done = self.step_idx
            else:
                done = None if self.weights_touched else step_at_start
            if done is not None and done > saved_step:
                try:
                    if not recorded:
                        rewind(self, sampler, before_step)
                    self.save(ckpt_root, sampler, history)
                    prune_checkpoints(ckpt_root, rc.keep_checkpoints)
                    warnings.warn(f"PPO: an error in step {step_at_start + 1}; the {self.step_idx} completed steps "
                                  f"were checkpointed in {ckpt_root} (run.resume=true continues from them)",
                                  stacklevel=2)
                except Exception as e:  # the original error matters more
                    warnings.warn(f"PPO: an error in step {step_at_start + 1}, and checkpointing the completed "
                                  f"steps failed too: {e!r}", stacklevel=2)
            logger.close()
            raise
        finally:
            if bar is not None:
                bar.close()
        last = latest_checkpoint(ckpt_root)
        if last is None or last.name != f"step-{self.step_idx:06d}":
            last = self.save(ckpt_root, sampler, history)
            prune_checkpoints(ckpt_root, rc.keep_checkpoints)
        summary["checkpoint"] = str(last)
        if eval_prompts:
            after, samples = self.evaluate(eval_prompts, rc.eval_samples)
            summary["eval_after"], summary["samples_after"] = after, samples
            logger.log(self.step_idx, {"eval/reward": after})
            history.append({"step": self.step_idx, "eval/reward": after})
        if rc.plot:
            summary["plot"] = str(plot_curves(history, out_dir / "reward_curve.png"))
        logger.close()
        summary["history"] = history
        summary["steps"] = self.step_idx
        summary["skipped_steps"] = sum(1 for h in history if h.get("skipped/nonfinite_reward"))
        summary["skipped_updates"] = int(sum(h.get("skipped/nonfinite_updates", 0.0) for h in history))
        ran = [h for h in history[first_new:] if "step" in h and "eval/reward" not in h]
        if ran and not any(h.get("optim/updates", 0.0) for h in ran):
            warnings.warn(f"PPO: none of the {len(ran)} steps of this run updated the weights (skipped steps: "
                          f"{summary['skipped_steps']}, optimizer steps skipped for a non-finite loss or gradient: "
                          f"{summary['skipped_updates']}); check the reward and ppo/optim settings", stacklevel=2)
        return summary
