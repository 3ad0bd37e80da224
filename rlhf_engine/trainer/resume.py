"""What makes a PPO run resumable: the checks a checkpoint must pass before it is loaded, the fingerprint of the
weights a run started from, and the state a step changes before its first optimizer step (rewound when the step
fails, so that the completed steps can be checkpointed as an uninterrupted run would have them)."""
from __future__ import annotations

import copy
import math
import warnings

import torch

# settings that give the trainer another set of tensors or another meaning of its state: a checkpoint of one does
# not resume under another (lora.* too, where LoRA is on). The model itself is told by its weights' fingerprint, not
# by its path or dtype string (a moved directory, "auto" for "float32"); how it runs may change
RESUME_STRUCTURE = ("ppo.critic", "ppo.critic_init", "ppo.advantage", "ppo.samples_per_prompt", "ppo.adaptive_kl",
                    "ppo.normalize_rewards")


def _plain_value(v):
    return list(v) if isinstance(v, tuple) else v


def weights_fingerprint(model, base_only: bool = False) -> float:
    """A number that tells two models' weights apart: the sum of every parameter (LoRA adapters left out with
    ``base_only``), in fp64. One reduction a tensor and one host sync, once per trainer."""
    sums = [p.detach().sum(dtype=torch.float64) for n, p in model.named_parameters()
            if not (base_only and "lora_" in n)]
    return float(torch.stack(sums).sum()) if sums else 0.0


def check_resumable(cfg, reference_fingerprint: float, path, state: dict) -> None:
    """ValueError naming what differs when the checkpoint's run had another shape (LoRA, critic, estimator) or
    started from other reference weights; a warning for other settings that differ, since the resumed run continues
    the checkpoint's optimizer, schedule and KL coefficient."""
    saved = state.get("config")
    if saved is None:  # a checkpoint from before the config was saved
        return
    now = cfg.to_dict()
    diff = {f"{sec}.{k}": (v, now.get(sec, {}).get(k)) for sec, vals in saved.items() for k, v in vals.items()
            if _plain_value(now.get(sec, {}).get(k)) != _plain_value(v)}
    lora_on = saved.get("lora", {}).get("enabled") or now["lora"]["enabled"]
    structural = [k for k in diff if (lora_on and k.startswith("lora.")) or k in RESUME_STRUCTURE]
    if structural:
        raise ValueError(f"run.resume: the checkpoint {path} was written by a run with other settings: "
                         + "; ".join(f"{k} was {diff[k][0]!r}, is {diff[k][1]!r}" for k in structural)
                         + ". Resume with the same settings, or start a new run (run.resume=false)")
    fp = state.get("reference_fingerprint")
    if fp is not None and not math.isclose(fp, reference_fingerprint, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"run.resume: the checkpoint {path} was written by a run that started from other weights "
                         "(the reference model's fingerprint differs): resume with the model the run started from")
    other = [k for k in diff if not k.startswith(("run.", "model.", "lora.")) and k not in structural]
    if other:
        warnings.warn("run.resume: settings changed since the checkpoint: "
                      + "; ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in other)
                      + " (the optimizer's learning rate, the schedule and the KL coefficient continue from the "
                      "checkpoint)", stacklevel=4)


_MOMENTS = ("count", "mean", "m2")


def rewind_point(trainer, sampler) -> tuple:
    """What a step changes besides the weights and the optimizer: the step counter, the prompt position, the random
    states, the running score statistics and the KL coefficient (``rewind`` puts them back). No device sync: the
    statistics are kept by reference (``RunningMoments.update`` replaces its tensors, never writes them)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    moments = tuple(getattr(trainer.score_moments, k) for k in _MOMENTS)
    return (trainer.step_idx, sampler.state_dict(), trainer.gen.get_state(), torch.get_rng_state(), cuda, moments,
            copy.deepcopy(trainer.kl_ctl.state_dict()))


def rewind(trainer, sampler, point: tuple) -> None:
    step, sampler_state, gen_state, cpu_rng, cuda_rng, moments, kl_ctl = point
    trainer.step_idx = step
    sampler.load_state_dict(sampler_state)
    trainer.gen.set_state(gen_state)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    for k, t in zip(_MOMENTS, moments):
        setattr(trainer.score_moments, k, t)
    trainer.kl_ctl.load_state_dict(kl_ctl)
