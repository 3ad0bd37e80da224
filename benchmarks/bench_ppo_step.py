"""Benchmark: one whole PPO step, plain Hugging Face + PyTorch (as TRL does it) vs rlhf_engine's PPOTrainer.

Shape: Qwen2-0.5B (494M parameters, 24 layers, 14/2 heads, D=64, V=151936) with random bf16 weights
for all four roles (actor, reference, critic, reward model); B=64 prompts of 128 random tokens,
256 new tokens each (EOS can never be sampled, so every response is full length), GAE, one epoch
of minibatches of 16 sequences. Both sides are measured in the same process, one after the other.

Baseline ("HF+PyTorch (TRL-style)"): transformers ``Qwen2ForCausalLM`` actor and reference, critic
and reward = transformers trunk + Linear(H, 1) head; ``model.generate`` sampling (dynamic cache,
``min_new_tokens`` = ``max_new_tokens``); scoring in chunks of 16 sequences with full logits →
``log_softmax(float)`` → ``gather``; KL-penalized rewards, the Python-loop GAE
(``algo.gae_reference``) and masked whitening; minibatch updates with the eager PPO loss
(``algo.ppo_loss_reference``) and ``torch.optim.AdamW`` on the bf16 parameters (what a plain
PyTorch loop on a bf16 model does). Reference numbers (H100, shared/BASELINES.md): 8.0 s per step,
generation 82%, 22.4 GB peak.

Ours ("ours (PPOTrainer)"): ``rlhf_engine.model.llama.CausalLM`` roles in bf16 on CUDA and
``rlhf_engine.trainer.ppo.PPOTrainer.train_step`` with a separate critic and a token reward (a
reward model: a second trunk + linear head on the last token); the trainer keeps fp32 master
weights for the actor and the critic (``MasterWeightAdamW``), and recomputes each decoder layer in the
backward (``Setup.grad_ckpt``: the memory target needs it, see there). "ours (PPOTrainer, train CUDA graph)": the
same trainer afterwards with ``ppo.train_cuda_graph`` on (opt-in; each micro-batch's forward + backward replayed
as a CUDA graph once its shapes recur), timed on its third step, when every micro-batch is a replay.

Both sides use the same hyperparameters: temperature 1, no top-k/top-p, β = 0.05 (k1 in the
reward), scores clipped to ±10, γ = 1, λ = 0.95, clip 0.2, value clip 0.2, vf_coef 0.5, AdamW
lr 1e-5, betas (0.9, 0.95), grad clip 1.0. Phases are timed with the trainer's ``PhaseTimer``
(CUDA-synchronized wall time; peak = ``torch.cuda.max_memory_allocated`` inside the phase,
everything live included). tok/s counts prompt + response tokens, B·(P+N) per step, as
BASELINES.md does.

Floor (napkin, H100): generation ≈ 256 decode steps × (0.99 GB of weights + KV) / 3.0 TB/s ≈ 0.1 s;
scoring ≈ 4 forwards × 2·494M·24,576 tokens ≈ 9.7e13 FLOP ≈ 0.13 s; training ≈ 6·(494M + 358M)·24,576
≈ 1.3e14 FLOP ≈ 0.17 s: ≈ 0.4 s per step. Target: ≥ 5x the baseline step, with no more peak memory.

    python benchmarks/bench_ppo_step.py             # needs CUDA (exits with a message on a CPU)
    python benchmarks/bench_ppo_step.py --smoke     # tiny shapes on the CPU, a few seconds: checks the script
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record, smoke as smoke_env, time_left  # noqa: E402

PHASES = ("generate", "score", "advantage", "train")


@dataclass
class Setup:
    """Shapes and hyperparameters shared by both sides."""

    preset: str = "qwen2-0.5b"
    batch: int = 64  # B prompts (one sample each)
    prompt_len: int = 128  # P
    new_tokens: int = 256  # N
    minibatch: int = 16  # sequences per optimizer step (and per scoring chunk)
    temperature: float = 1.0
    kl_coef: float = 0.05
    reward_clip: float = 10.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    lr: float = 1e-5
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    # Ours recomputes each decoder layer in the backward (activation checkpointing): the fp32 masters, moments
    # and fp32 gradients of two trainable 494M models are ~18 GB before any activation, and the target is no
    # more peak memory than the baseline's 22.4 GB; the recompute costs ~1/3 more training FLOPs.
    grad_ckpt: bool = True

    @property
    def label(self) -> str:
        return (f"{self.preset} x4 roles B={self.batch} P={self.prompt_len} N={self.new_tokens} "
                f"mb={self.minibatch}" + (" ckpt" if self.grad_ckpt else ""))


SMOKE = Setup(preset="tiny-qwen2", batch=4, prompt_len=8, new_tokens=8, minibatch=2)


def _phase_timer(device: torch.device):
    from rlhf_engine.trainer.ppo import PhaseTimer

    return PhaseTimer(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- baseline: HF + PyTorch

class HFScalarModel(nn.Module):
    """TRL's value / reward model layout: a transformers trunk + Linear(H, 1).

    forward(input_ids (B, T) int64, attention_mask (B, T)) -> (B, T) fp32 scalars.
    """

    def __init__(self, hf_config):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_config(hf_config)
        self.head = nn.Linear(hf_config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()


def _hf_logprobs(lm, seq: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, N) fp32 log-probs of the response tokens: full logits → log_softmax(float) → gather (TRL's path)."""
    P = seq.shape[1] - resp.shape[1]
    logits = lm(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1]  # (B, N, V): position t predicts t + 1
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, N, V) fp32
    return logp.gather(-1, resp[..., None]).squeeze(-1)


class HFBaseline:
    """The four roles as transformers models, trained with plain PyTorch."""

    def __init__(self, s: Setup, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        from rlhf_engine.model.config import preset

        self.s, self.device = s, device
        hf_cfg = preset(s.preset).to_hf()
        self.pad_id = hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0
        with torch.device(device):
            self.actor = AutoModelForCausalLM.from_config(hf_cfg).to(dtype)
            self.critic = HFScalarModel(hf_cfg).to(dtype)
            self.reward = HFScalarModel(hf_cfg).to(dtype)
        self.ref = copy.deepcopy(self.actor).eval().requires_grad_(False)
        self.reward.eval().requires_grad_(False)
        opt = dict(lr=s.lr, betas=s.betas, eps=1e-8, weight_decay=0.0, foreach=device.type == "cuda")
        self.opt_actor = torch.optim.AdamW(self.actor.parameters(), **opt)
        self.opt_critic = torch.optim.AdamW(self.critic.parameters(), **opt)

    def step(self, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
        """One PPO step on (B, P) prompt ids; returns PhaseTimer metrics + time/step_s."""
        from rlhf_engine import algo

        s, dev = self.s, self.device
        timer = _phase_timer(dev)
        _sync(dev)
        t0 = time.perf_counter()
        B, P = prompt_ids.shape
        with timer("generate"), torch.no_grad():
            self.actor.eval()
            seq = self.actor.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                      do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      temperature=s.temperature, top_k=0, top_p=1.0, pad_token_id=self.pad_id)
        if seq.shape != (B, P + new_tokens):
            raise RuntimeError(f"HF generate: expected {(B, P + new_tokens)} tokens, got {tuple(seq.shape)}")
        resp = seq[:, P:]  # (B, N)
        attn = torch.ones_like(seq)
        mask = torch.ones(resp.shape, dtype=torch.float32, device=dev)  # no EOS: every token is valid
        with timer("score"), torch.no_grad():
            parts = {"old": [], "ref": [], "values": [], "scores": []}
            for c in range(0, B, s.minibatch):
                sl = slice(c, c + s.minibatch)
                parts["old"].append(_hf_logprobs(self.actor, seq[sl], attn[sl], resp[sl], s.temperature))
                parts["ref"].append(_hf_logprobs(self.ref, seq[sl], attn[sl], resp[sl], s.temperature))
                parts["values"].append(self.critic(seq[sl], attn[sl])[:, P - 1:-1])  # (b, N)
                parts["scores"].append(self.reward(seq[sl], attn[sl])[:, -1])  # (b,) at the last token
            old, ref, values, scores = (torch.cat(parts[k]) for k in ("old", "ref", "values", "scores"))
        with timer("advantage"):
            rewards, _ = algo.kl_penalized_rewards(scores, old, ref, mask, kl_coef=s.kl_coef, kind="k1",
                                                   reward_clip=s.reward_clip)
            adv, returns = algo.gae_reference(rewards, values, mask, gamma=s.gamma, lam=s.lam)  # Python loop
            adv = algo.masked_whiten(adv, mask)
        with timer("train"):
            self.actor.train()
            self.critic.train()
            order = torch.randperm(B, device=dev)
            for c in range(0, B, s.minibatch):
                idx = order[c:c + s.minibatch]
                logp = _hf_logprobs(self.actor, seq[idx], attn[idx], resp[idx], s.temperature)
                v = self.critic(seq[idx], attn[idx])[:, P - 1:-1]
                loss, _ = algo.ppo_loss_reference(logp, old[idx], adv[idx], mask[idx], values=v,
                                                  old_values=values[idx], returns=returns[idx], clip_low=s.clip,
                                                  value_clip=s.value_clip, vf_coef=s.vf_coef)
                self.opt_actor.zero_grad(set_to_none=True)
                self.opt_critic.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.actor.parameters(), s.grad_clip)
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), s.grad_clip)
                self.opt_actor.step()
                self.opt_critic.step()
        _sync(dev)
        out = dict(timer.metrics)
        out["time/step_s"] = time.perf_counter() - t0
        return out


# ----------------------------------------------------------------------------- ours: rlhf_engine PPOTrainer

class IdTokenizer:
    """A tokenizer stub for random-token prompts: a prompt is its token ids written as "12 7 391".

    ``eos_token_id`` is outside the vocabulary, so it is never sampled and every response has
    exactly ``max_new_tokens`` tokens (as the baseline's ``min_new_tokens``).
    """

    def __init__(self, vocab_size: int, pad_token_id: int):
        self.eos_token_id = vocab_size
        self.pad_token_id = pad_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_ours(s: Setup, device: torch.device, dtype: torch.dtype, steps: int):
    """PPOTrainer with separate critic and a reward-model token reward, all roles of preset ``s.preset``."""
    from rlhf_engine.config import EngineConfig
    from rlhf_engine.model.config import preset
    from rlhf_engine.model.heads import ScalarModel
    from rlhf_engine.model.llama import CausalLM
    from rlhf_engine.rewards import token_reward
    from rlhf_engine.trainer.actor_critic import separate_critic
    from rlhf_engine.trainer.ppo import PPOTrainer

    mcfg = preset(s.preset)
    with torch.device(device):
        actor = CausalLM(mcfg).to(dtype)
        critic_lm = CausalLM(mcfg).to(dtype)
        rm = ScalarModel.from_config(mcfg).to(dtype)
    rm.eval().requires_grad_(False)
    actor.gradient_checkpointing = critic_lm.gradient_checkpointing = s.grad_ckpt
    reward = token_reward(lambda ids, mask: rm.score_sequences(ids, mask))  # (B,) fp32 at the last valid token
    cfg = EngineConfig.from_dict({
        "generation": {"max_new_tokens": s.new_tokens, "max_prompt_len": s.prompt_len,
                       "temperature": s.temperature, "top_k": 0, "top_p": 1.0},
        "ppo": {"advantage": "gae", "critic": "separate", "epochs": 1, "minibatch_size": s.minibatch,
                "micro_batch_size": s.minibatch, "gamma": s.gamma, "lam": s.lam, "kl_coef": s.kl_coef,
                "kl_kind": "k1", "reward_clip": s.reward_clip, "clip_low": s.clip, "value_clip": s.value_clip,
                "vf_coef": s.vf_coef, "whiten_advantages": True},
        "optim": {"lr": s.lr, "betas": list(s.betas), "grad_clip": s.grad_clip, "weight_decay": 0.0},
        "run": {"steps": steps, "prompts_per_step": s.batch, "device": str(device), "progress": False,
                "tensorboard": False, "plot": False},
    })
    tok = IdTokenizer(mcfg.vocab_size, mcfg.pad_token_id if mcfg.pad_token_id is not None else 0)
    return PPOTrainer(cfg, actor, tok, reward, critic=separate_critic(critic_lm), device=device)


# ----------------------------------------------------------------------------- report

def _mean(runs: list[dict]) -> dict:
    """Mean over steps of the timing, memory and token metrics."""
    keys = [k for k in runs[0] if k.startswith(("time/", "mem/", "tokens/"))]
    return {k: sum(float(r[k]) for r in runs) / len(runs) for k in keys}


def _rows(s: Setup, impl: str, m: dict, base: dict | None) -> list[dict]:
    """The step row and one row per phase for one side (``base``: the baseline's metrics, for ratios)."""
    nan = float("nan")
    tokens = s.batch * (s.prompt_len + s.new_tokens)
    step = m["time/step_s"]
    peaks = [m[f"mem/{p}_peak_mb"] for p in PHASES if f"mem/{p}_peak_mb" in m]
    rows = [{"op": "ppo step", "shape": s.label, "impl": impl, "ms": step * 1e3, "metric": "throughput",
             "value": tokens / step, "unit": "tok/s", "peak_mb": max(peaks) if peaks else nan,
             "vs_baseline": base["time/step_s"] / step if base else 1.0,
             "gen_frac": m.get("time/generate_s", nan) / step}]
    for p in PHASES:
        t = m.get(f"time/{p}_s", nan)
        rows.append({"op": f"ppo step: {p}", "shape": s.label, "impl": impl, "ms": t * 1e3, "metric": "share of step",
                     "value": t / step, "unit": "fraction", "peak_mb": m.get(f"mem/{p}_peak_mb", nan),
                     "vs_baseline": base[f"time/{p}_s"] / t if base and t > 0 else 1.0})
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(smoke: bool | None = None, steps: int = 1, device: str | None = None, baseline: bool = True) -> list[dict]:
    """Measure the baseline step, then ours; returns the rows (recorded to the results CSV unless smoke).
    smoke: None -> ``RLHF_BENCH_SMOKE=1`` (``run_all.py --smoke``)."""
    smoke = smoke_env() if smoke is None else smoke
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    if dev.type != "cuda" and not smoke:
        print("bench_ppo_step: needs a CUDA GPU (use --smoke for a tiny CPU run of the script); skipping.")
        return []
    s = SMOKE if smoke else Setup()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tag = " (smoke: tiny shapes, timings meaningless)" if smoke else ""
    print(f"bench_ppo_step: {s.label} on {dev} in {dtype}{tag}", flush=True)
    torch.manual_seed(0)
    from rlhf_engine.model.config import preset

    vocab = preset(s.preset).vocab_size
    prompt_ids = torch.randint(0, vocab, (s.batch, s.prompt_len), device=dev)
    rows: list[dict] = []

    base = None
    if baseline:
        t = time.perf_counter()
        hf = HFBaseline(s, dev, dtype)
        print(f"  baseline built in {time.perf_counter() - t:.1f} s; warm-up step (8 new tokens)", flush=True)
        hf.step(prompt_ids, new_tokens=min(8, s.new_tokens))  # cuBLAS, allocator and AdamW state
        runs = []
        for i in range(steps):
            _free(dev)  # as before each of our steps: both sides start from an empty allocator cache
            runs.append(hf.step(prompt_ids, new_tokens=s.new_tokens))
            print(f"  baseline step {i}: {runs[-1]['time/step_s']:.2f} s", flush=True)
        base = _mean(runs)
        del hf
        _free(dev)
        rows += _rows(s, "HF+PyTorch (TRL-style)", base, None)
        if not smoke:
            record(rows)  # recorded now: a later failure of ours must not lose the baseline

    t = time.perf_counter()
    trainer = build_ours(s, dev, dtype, steps=steps + 2)  # + the warm-up and the profiled step
    prompts = [" ".join(str(int(x)) for x in row) for row in prompt_ids.tolist()]
    print(f"  ours built in {time.perf_counter() - t:.1f} s; warm-up step (compiles and autotunes)", flush=True)
    t = time.perf_counter()
    trainer.train_step(prompts)
    print(f"  ours warm-up step: {time.perf_counter() - t:.1f} s", flush=True)
    runs = []
    for i in range(steps):
        _free(dev)
        m = trainer.train_step(prompts)
        if m.get("skipped/nonfinite_reward"):
            raise RuntimeError("bench_ppo_step: the trainer skipped the step (non-finite reward)")
        if abs(m.get("tokens/generated", 0) - s.batch * s.new_tokens) > 0.5:
            raise RuntimeError(f"bench_ppo_step: expected {s.batch * s.new_tokens} generated tokens, "
                               f"got {m.get('tokens/generated')}")
        runs.append(m)
        print(f"  ours step {i}: {m['time/step_s']:.2f} s", flush=True)
    ours = _rows(s, "ours (PPOTrainer)", _mean(runs), base)
    rows += ours
    if dev.type == "cuda" and time_left() > 45:  # after the default's rows: the opt-in CUDA-graph training
        try:
            graphed_rows = _train_graph_rows(trainer, prompts, s, base, dev)
            rows += graphed_rows
            ours += graphed_rows
        except Exception as e:  # noqa: BLE001 - report and keep the measured rows
            print(f"  train CUDA graph FAILED {type(e).__name__}: {e}")
    print_table(rows)
    if not smoke:
        record(ours)
    if time_left() > 30:  # a diagnostic, after the rows are recorded: never at their cost
        try:
            _print_phase_kernel_time(trainer, prompts, _mean(runs), dev)
        except Exception as e:  # noqa: BLE001 - report and keep the measured rows
            print(f"  phase profile FAILED {type(e).__name__}: {e}")
    return rows


def _train_graph_rows(trainer, prompts: list[str], s, base: dict | None, dev: torch.device) -> list[dict]:
    """The same trainer with ``ppo.train_cuda_graph`` on (``trainer/train_graph.py``): its first step runs the
    micro-batches eagerly (their shapes first seen), the second captures one and replays the rest, the third
    replays every one and is the timed row. Reported beside: the replay counts and the peak memory."""
    trainer.train_graphs = graphs = trainer.make_train_graphs()
    try:
        for what in ("shapes seen", "capture"):
            t = time.perf_counter()
            trainer.train_step(prompts)
            print(f"  ours, train CUDA graph ({what}): {time.perf_counter() - t:.2f} s; {graphs.counts}", flush=True)
        _free(dev)
        m = trainer.train_step(prompts)
        print(f"  ours, train CUDA graph (replays): {m['time/step_s']:.2f} s; {graphs.counts}; reserved "
              f"{torch.cuda.memory_reserved(dev) / 2**30:.1f} GiB", flush=True)
    finally:
        trainer.train_graphs = None  # the graphs and their pool go; the phase profile after this is the default's
        graphs.reset()
    if graphs.counts["replayed"] == 0:
        raise RuntimeError(f"no micro-batch was replayed: {graphs.counts}")
    return _rows(s, "ours (PPOTrainer, train CUDA graph)", _mean([m]), base)


def _print_phase_kernel_time(trainer, prompts: list[str], walls: dict, dev: torch.device) -> None:
    """One more step under torch.profiler: each phase's kernel time beside its wall time in the timed steps. A phase
    whose kernels take a small part of its wall time is bound by its host side (Python, dispatch, launches).

    On CUDA a kernel counts for the phase whose ``phase/<name>`` range (PhaseTimer's, which synchronizes the device
    at both ends) holds the kernel's start on the profiler's timeline. Attributing kernels to the range that
    launched them instead (its ``device_time_total``) misses the backward's kernels, which the autograd engine
    launches from its own thread: the H200 run of 1f4b6a6 reported 0.13 s of kernels for a training phase whose
    FLOPs alone need ~0.2 s. Kernels replayed from a CUDA graph (generation) may not be reported at all. CPU: the
    ranges' CPU time instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    _free(dev)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.train_step(prompts)
    events = prof.events()
    ranges = [(e.name[len("phase/"):], e.time_range.start, e.time_range.end, e.cpu_time_total)
              for e in events if e.name.startswith("phase/") and e.device_type == DeviceType.CPU]
    busy = {name: 0.0 for name, *_ in ranges}
    if cuda:
        for e in events:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            for name, start, end, _ in ranges:
                if start <= e.time_range.start < end:
                    busy[name] += e.self_device_time_total / 1e6
                    break
    else:
        for name, _, _, cpu_us in ranges:
            busy[name] += cpu_us / 1e6
    print("  phase        wall s (timed steps)   " + ("kernel s (profiled step)" if cuda else "CPU s (profiled step)"))
    for name, s in busy.items():
        print(f"  {name:<12} {walls.get(f'time/{name}_s', float('nan')):>10.3f}            {s:>10.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="One PPO step: HF + PyTorch baseline vs rlhf_engine's PPOTrainer.")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (tiny-qwen2, B=4) on the CPU; not recorded")
    ap.add_argument("--steps", type=int, default=1, help="measured steps per side, after one warm-up step")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    ap.add_argument("--no-baseline", action="store_true", help="measure ours only")
    a = ap.parse_args()
    main(smoke=a.smoke, steps=a.steps, device=a.device, baseline=not a.no_baseline)
