"""The PPO micro-batch's forward + backward replayed as a CUDA graph (``ppo.train_cuda_graph``, opt-in).

Why: on the H200 run of ``926e32e`` the PPO step's training phase took 0.694 s of wall time for 0.384 s of kernels.
The host (Python, PyTorch's dispatch, the autograd engine, ~1,800 launches a micro-batch for actor and critic) is
slower than the GPU, which waits for it: 45% of the phase. A CUDA graph replays the same kernels with no host work
per kernel, so a replayed micro-batch costs its kernels' time.

How:
- A micro-batch's inputs (the rollout rows, the minibatch's token and sequence counts) are copied into static
  tensors; the graph reads them, runs the loss's forward and ``backward()``, and accumulates the gradients where
  the eager path does: into each fp32 master's ``.grad`` (``optim.MasterWeightAdamW``'s hook, recorded as one
  in-place add) or an fp32 parameter's. Those gradient tensors must therefore live as long as the graph: while
  graphs are on, the trainer zeroes them in place instead of dropping them (``zero_grad(set_to_none=False)``,
  ~4 bytes a trainable parameter held between steps).
- A graph is captured for a shape key (every input's shape and dtype, the loss's constants) only when the key was
  already seen in an EARLIER ``update()`` call: capturing costs an eager pass of host time with the GPU idle, so
  shapes that change every step (responses trimmed to their longest) never pay for it, and fixed shapes
  (``generation.trim=False``-like rollouts, the PPO benchmark's) pay once. The micro-batch that triggers the
  capture runs eagerly first, on the capture's side stream (the warm-up CUDA graphs need: autotuning, lazy caches,
  workspaces), and its gradients count; the capture itself executes nothing.
- A graph is replayed only while everything it captured by address is unchanged: the trainable parameters and the
  gradient tensors (``data_ptr`` of each, checked before each replay); otherwise every graph is dropped and the
  micro-batch runs eagerly.
- The graphs share one memory pool (they never run concurrently, and each consumes within its replay all it
  writes there but its metrics, which are cloned at once). At most ``max_graphs`` are kept (least recently used
  first out). The pool stays reserved while a graph lives, generation and scoring included: one micro-batch's
  forward + backward peak, on top of the fp32 gradients kept between steps.
- A capture that fails (an op that cannot be captured, e.g. ``torch.utils.checkpoint``'s RNG state, which the
  model falls back to under dropout or autocast) warns once and leaves that shape eager; the warm-up already
  accumulated the micro-batch's gradients.
- The difference from the eager path: a parameter whose gradient is zeroed in place, not dropped, still gets
  AdamW's weight decay and moment decay in a minibatch whose loss does not reach it (eager skips it). A shape is
  captured only once every trainable parameter got a gradient in its warm-up.

What it does not cover: anything that reads a device value on the host inside the micro-batch (there is none on
the PPO path: the loss's metrics stay tensors), and the optimizer step and gradient clipping (a few launches,
left eager).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict]]  # (part, num_tokens, num_seqs) -> (loss, metrics)


def _fields(part) -> dict:
    import dataclasses

    return {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}


def _key(part, num_tokens: torch.Tensor, num_seqs: torch.Tensor, consts: tuple) -> tuple:
    parts = tuple((k, None if t is None else (tuple(t.shape), t.dtype, str(t.device)))
                  for k, t in _fields(part).items())
    return parts, tuple(num_tokens.shape), tuple(num_seqs.shape), consts


class CudaGraphRecorder:
    """Captures ``fn`` into a ``torch.cuda.CUDAGraph`` in a shared memory pool; ``record`` returns the replay, which
    returns the outputs ``fn`` returned during the capture (rewritten by each replay)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def warm_stream(self):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        return s

    def end_warm(self, s) -> None:
        torch.cuda.current_stream(self.device).wait_stream(s)

    def record(self, fn: Callable[[], object]) -> Callable[[], object]:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn()

        def replay():
            g.replay()
            return out

        replay.graph = g  # keeps the graph (and through it its pool blocks) alive as long as the replay
        return replay


class TrainGraphs:
    """Runs PPO micro-batches (``loss_fn``'s forward and backward) as CUDA-graph replays (module docstring).

    Args:
        loss_fn: ``(part, num_tokens, num_seqs) -> (loss, metrics)``, the trainer's micro-batch loss.
        params: the trainable parameters, whose ``.grad`` (or whose fp32 master's, ``p._rlhf_master``) the
            backward accumulates into.
        watched: returns every other tensor the step reads by address (frozen weights, buffers): a replay needs
            them where they were at its capture. Default: none beyond ``params``.
        recorder: a ``CudaGraphRecorder`` (tests pass a stand-in that replays by re-running ``fn``).
        max_graphs: graphs kept (LRU; they share one memory pool, so a graph costs little beyond its outputs).
    """

    def __init__(self, loss_fn: LossFn, params: list[torch.Tensor], *, watched: Callable[[], list] = None,
                 recorder=None, max_graphs: int = 8, device: Optional[torch.device] = None):
        if recorder is None:
            if device is None or device.type != "cuda":
                raise ValueError(f"ppo.train_cuda_graph: needs a CUDA device, got {device}")
            recorder = CudaGraphRecorder(device)
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected an int >= 1, got {max_graphs!r}")
        self.loss_fn, self.params, self.consts = loss_fn, list(params), ()
        self.watched = watched or (lambda: [])
        self.recorder, self.max_graphs = recorder, max_graphs
        self._graphs: OrderedDict = OrderedDict()  # key -> (replay, static inputs, addresses)
        self._seen: OrderedDict = OrderedDict()  # key -> the last update() that ran it eagerly (the newest 16)
        self._never: set = set()  # keys whose capture failed: eager from then on
        self._update = 0
        self.counts = {"eager": 0, "captured": 0, "replayed": 0, "capture_failed": 0}

    def begin_update(self, consts: tuple = ()) -> None:
        """Called at the start of each ``update()``: keys seen before this call may be captured. ``consts``: the
        values the loss bakes into its kernels (temperature, coefficients): part of the shape key."""
        self._update += 1
        self.consts = tuple(consts)

    def reset(self) -> None:
        """Drop every graph (their pool blocks go back when the last replay is gone)."""
        self._graphs.clear()

    def _grad_owners(self) -> list[torch.Tensor]:
        """The tensor whose ``.grad`` holds each parameter's gradient: its fp32 master, or itself."""
        owners = []
        for p in self.params:
            m = getattr(p, "_rlhf_master", None)
            owners.append(p if m is None else m)
        return owners

    def _addresses(self) -> tuple:
        """What a graph reads or writes by address outside its pool: the parameters, the gradient tensors and the
        watched tensors (frozen weights, buffers)."""
        return (tuple((p.data_ptr(), None if g.grad is None else g.grad.data_ptr())
                      for p, g in zip(self.params, self._grad_owners())),
                tuple(t.data_ptr() for t in self.watched()))

    def run(self, part, num_tokens: torch.Tensor, num_seqs: torch.Tensor) -> dict:
        """One micro-batch's forward and backward (gradients accumulated); returns its metrics (tensors)."""
        key = _key(part, num_tokens, num_seqs, self.consts)
        hit = self._graphs.get(key)
        if hit is not None:
            replay, static, addrs = hit
            if addrs == self._addresses():
                self._graphs.move_to_end(key)
                for name, t in _fields(part).items():
                    if t is not None:
                        static["part"][name].copy_(t)
                static["num_tokens"].copy_(num_tokens)
                static["num_seqs"].copy_(num_seqs)
                self.counts["replayed"] += 1
                return {k: v.clone() for k, v in replay().items()}
            self.reset()  # a parameter or a gradient tensor moved: nothing captured is valid any more
        last = self._seen.get(key)
        if last is None or last == self._update or key in self._never:  # not run in an earlier update(): eager
            self._mark_seen(key)
            self.counts["eager"] += 1
            return self._eager(part, num_tokens, num_seqs)
        return self._capture(key, part, num_tokens, num_seqs)

    def _mark_seen(self, key) -> None:
        self._seen[key] = self._update
        self._seen.move_to_end(key)
        while len(self._seen) > 16:  # shapes that change every step: a bounded memory of them
            self._seen.popitem(last=False)

    def _eager(self, part, num_tokens, num_seqs) -> dict:
        loss, metrics = self.loss_fn(part, num_tokens, num_seqs)
        loss.backward()
        return metrics

    def _capture(self, key, part, num_tokens, num_seqs) -> dict:
        # the warm-up: this micro-batch, eagerly and for real, on the stream the capture will use
        s = self.recorder.warm_stream()
        if s is not None:
            with torch.cuda.stream(s):
                metrics = self._eager(part, num_tokens, num_seqs)
            self.recorder.end_warm(s)
        else:
            metrics = self._eager(part, num_tokens, num_seqs)
        missing = [i for i, g in enumerate(self._grad_owners()) if self.params[i].requires_grad and g.grad is None]
        if missing:  # a parameter the loss does not reach: its gradient would be made inside the capture, where
            # its values exist only once a replay ran; keep that shape eager
            self._mark_seen(key)
            self.counts["eager"] += 1
            return metrics
        fields = _fields(part)
        static = {"part": {k: None if t is None else t.clone() for k, t in fields.items()},
                  "num_tokens": num_tokens.clone(), "num_seqs": num_seqs.clone()}
        static_part = type(part)(**static["part"])

        def step():
            loss, m = self.loss_fn(static_part, static["num_tokens"], static["num_seqs"])
            loss.backward()
            return m

        try:
            replay = self.recorder.record(step)
        except Exception as e:  # noqa: BLE001 - e.g. an op that cannot be captured: this shape stays eager
            # (the capture executed nothing: the warm-up's gradients are the micro-batch's, counted once). A
            # low-precision parameter may hold a gradient the aborted backward allocated and never computed (its hook
            # did not run): dropped, or the optimizer would move it into the master
            for p in self.params:
                if getattr(p, "_rlhf_master", None) is not None:
                    p.grad = None
            self._never.add(key)
            self.counts["capture_failed"] += 1
            warnings.warn(f"ppo.train_cuda_graph: capturing a micro-batch failed ({type(e).__name__}: {e}); its "
                          "shape runs eagerly from now on", RuntimeWarning, stacklevel=3)
            return metrics
        self._graphs[key] = (replay, static, self._addresses())
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        self.counts["captured"] += 1
        return metrics
