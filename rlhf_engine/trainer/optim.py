"""Optimizer with fp32 master weights, and the learning-rate schedule.

On a GPU the model's parameters are bf16 and are used as they are by both generation and
training. The optimizer keeps an fp32 master copy of each low-precision parameter, applies
AdamW to the master, and writes the result back *in place* into the model's parameter, so the
tensors that generation reads never move (same ``data_ptr``) and no copy of the model is made
per rollout. fp32 parameters (the CPU case) are their own masters: no copy at all.

Gradients of a low-precision parameter are accumulated in fp32, in its master's ``.grad``: a hook
that runs after autograd accumulates into the parameter adds ``p.grad`` to ``master.grad`` and frees
``p.grad``. Micro-batches therefore sum in fp32 (not in bf16, whose 8-bit mantissa would round every
partial sum), the norm for clipping is taken over fp32 gradients, and no bf16 gradient outlives its
backward. The hook follows ``p._rlhf_master``, so a later optimizer over the same parameters (SFT,
then PPO) takes the gradients over from an earlier one.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from rlhf_engine.kernels._args import int_value, real_value


def _grad_to_master(p: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a low-precision parameter: move its gradient into its fp32 master."""
    m = getattr(p, "_rlhf_master", None)
    if m is None or p.grad is None:
        return
    if m.grad is None:
        m.grad = p.grad.float()
    else:
        m.grad.add_(p.grad)   # fp32 += bf16, rounded once into fp32
    p.grad = None


def _check_number(name: str, value, expected: str, ok) -> None:
    v = real_value(value)  # Python, NumPy, or a one-element tensor (torch's AdamW takes a tensor lr)
    if v is None or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_training_args(epochs, batch_size, grad_accum, max_steps, device) -> torch.device | None:
    """The loop arguments of ``train_sft`` / ``train_reward_model``; returns ``device`` as a torch.device (None: the
    model's), a ValueError naming a CUDA device where CUDA is not available."""
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if int_value(v) is None or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if max_steps is not None and (int_value(max_steps) is None or max_steps < 1):
        raise ValueError(f"max_steps: expected None or an int >= 1, got {max_steps!r}")
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available")
    return dev


def finite_step(opt, sched, *values: float) -> bool:
    """``opt.step()`` and ``sched.step()`` when every value (the step's loss, its gradient norm) is finite; else the
    gradients are dropped and nothing moves: a NaN/inf loss or gradient never reaches the weights. Returns whether
    it stepped."""
    if all(math.isfinite(v) for v in values):
        opt.step()
        sched.step()
        return True
    opt.zero_grad()
    return False


class MasterWeightAdamW:
    """AdamW over fp32 masters of the given parameters (see the module docstring).

    Args:
        params: iterable of parameters (those with ``requires_grad`` are optimized).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
    """

    def __init__(self, params, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        # the checks torch's AdamW does not make (an inf lr, eps = 0: NaN weights after one step) or that the
        # param groups below bypass (weight_decay)
        _check_number("lr", lr, "a finite number > 0", lambda v: v > 0)
        _check_number("eps", eps, "a finite number > 0", lambda v: v > 0)
        _check_number("weight_decay", weight_decay, "a finite number >= 0", lambda v: v >= 0)
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"betas: expected two values in [0, 1), got {betas!r}")
        for b in betas:
            _check_number("betas", b, "two values in [0, 1)", lambda v: 0 <= v < 1)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one trainable parameter")
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                        for p in self.params]
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p._rlhf_master = m
                if not getattr(p, "_rlhf_master_hooked", False):  # one hook per parameter, whichever optimizer
                    p.register_post_accumulate_grad_hook(_grad_to_master)
                    p._rlhf_master_hooked = True
        pairs = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        self._low = ([p for p, _ in pairs], [m for _, m in pairs]) if pairs else None  # (params, their masters)
        # Bias, norm and (most) 1-D parameters get no weight decay.
        decay = [m for p, m in zip(self.params, self.masters) if p.dim() >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        # The fused kernel where every master is on one kind of device, CUDA or the CPU: one pass over parameter,
        # gradient and both moments. On the CPU it is ~5x the foreach path's speed (SmolLM2-135M: 0.12 s a step
        # against 0.55-0.83 s; the demo takes two a PPO step); foreach for a mix of devices.
        fused = all(m.is_cuda for m in self.masters) or all(m.device.type == "cpu" for m in self.masters)
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps,
                                       **({"fused": True} if fused else {"foreach": True}))

    @property
    def param_groups(self):
        return self.inner.param_groups

    def release(self) -> None:
        """End of training: detach the fp32 masters from the parameters and drop the moments, so that ~12 bytes
        per low-precision parameter are freed with this optimizer (a parameter keeps a reference to its master
        for the gradient hook; without this, e.g. a trained reward model scoring PPO rollouts would hold 4 bytes
        per parameter of masters it never uses). The parameters keep their trained values; a new optimizer over
        them makes new masters from them. This optimizer cannot step afterwards."""
        for p, m in zip(self.params, self.masters):
            if getattr(p, "_rlhf_master", None) is m:
                del p._rlhf_master  # the hook finds no master and leaves a gradient on the parameter
        self.inner.state.clear()
        self.inner.param_groups.clear()  # the groups hold the masters too
        self.masters = []
        self.params = []
        self._low = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients, or with ``set_to_none=False`` zero the fp32 ones in place (the tensors a captured
        CUDA graph accumulates into stay where they are; ``trainer/train_graph.py``)."""
        if not set_to_none:
            grads = [m.grad for m in self._with_grad()]  # a gradient left on a parameter goes to its master first
            if grads:
                torch._foreach_zero_(grads)
            return
        for p, m in zip(self.params, self.masters):
            p.grad = None
            if m is not p:
                m.grad = None

    def _with_grad(self) -> list[torch.Tensor]:
        """The fp32 tensors holding gradients: the masters (a low-precision parameter's own ``.grad`` was
        moved into its master by the hook; a gradient still on it, e.g. set by hand, is moved now)."""
        for p in self.params:
            if p.grad is not None:
                _grad_to_master(p)
        return [m for m in self.masters if m.grad is not None]

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Total gradient norm over the fp32 gradients (a 0-dim tensor, no host sync); clips in place when
        ``max_norm`` is set."""
        if max_norm is not None:
            _check_number("max_norm", max_norm, "a finite number > 0, or None", lambda v: v > 0)
        owners = self._with_grad()
        if not owners:
            return torch.zeros((), device=self.params[0].device)
        if max_norm is None:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in owners]))
        return torch.nn.utils.clip_grad_norm_(owners, max_norm, foreach=True)

    @torch.no_grad()
    def step(self) -> None:
        self._with_grad()
        self.inner.step()
        if self.inner.defaults.get("fused"):
            # the fused kernel writes the masters without telling autograd: bump their version counters as an
            # in-place op would, so that autograd's check of saved tensors and batch_invariant.packed_gemms's
            # repacking see the step
            torch.autograd.graph.increment_version(self.masters)
        if self._low:  # in place, one call for all (~290 copy_ calls at Qwen2-0.5B): generation reads the same tensors
            torch._foreach_copy_(self._low[0], self._low[1])

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(),
                "masters": [None if m is p else m.detach() for p, m in zip(self.params, self.masters)]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                if m is not p and saved is not None:
                    m.copy_(saved)
                    p.copy_(saved)


def lr_schedule(optimizer: MasterWeightAdamW, *, schedule: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup then "constant", "linear" decay to 0, or "cosine" decay to 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule: expected 'constant', 'linear' or 'cosine', got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer.inner, factor)
