"""The PPO micro-batch as a CUDA-graph replay (``trainer/train_graph.py``, ``ppo.train_cuda_graph``).

On the CPU the graph is a stand-in that "captures" by keeping the step and "replays" by running it again on the
static inputs, so what is checked here is the plumbing, against the eager update bit for bit: inputs copied into
the static tensors before each replay, gradients accumulated into tensors that stay in place (zeroed, not
dropped), metrics cloned, shapes captured only when they recur across update() calls, every graph dropped when a
parameter or a gradient tensor moves. The capture itself (and its bf16 results) is the GPU test's.
"""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from rlhf_engine import EngineConfig  # noqa: E402
from rlhf_engine.trainer.actor_critic import separate_critic  # noqa: E402
from rlhf_engine.trainer.ppo import PPOTrainer  # noqa: E402
from rlhf_engine.trainer.rollout import Rollout, pad_rollout  # noqa: E402
from rlhf_engine.trainer.train_graph import TrainGraphs  # noqa: E402


class ReplayByRerun:
    """CPU stand-in for ``CudaGraphRecorder``: a capture executes nothing (as on a GPU); a replay runs the step and,
    as a graph does, writes its outputs into the same tensors each time."""

    def warm_stream(self):
        return None

    def end_warm(self, s):
        pass

    def record(self, fn):
        out = {}

        def replay():
            fresh = fn()
            if not out:
                out.update(fresh)
            for k, v in fresh.items():
                out[k].copy_(v)
            return out

        return replay


def _cfg(device="cpu", graph=False, pad=1, **ppo):
    return EngineConfig.from_dict({
        "generation": {"max_new_tokens": 5, "max_prompt_len": 6, "temperature": 0.9},
        "ppo": {"advantage": "gae", "critic": "separate", "minibatch_size": 4, "micro_batch_size": 2,
                "ent_coef": 0.01, "kl_loss_coef": 0.1, "train_cuda_graph": graph, "train_cuda_graph_pad": pad,
                **ppo},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "run": {"steps": 4, "prompts_per_step": 8, "device": device, "progress": False, "tensorboard": False,
                "plot": False}})


def _trainer(dtype, device="cpu", graph=False, recorder=None, pad=1):
    actor = tiny_model(0).to(device, dtype)
    critic = separate_critic(tiny_model(1).to(device, dtype))
    tr = PPOTrainer(_cfg(str(device), graph, pad), actor, byte_tokenizer(), lambda p, r: [0.0] * len(r),
                    critic=critic, device=device)
    if recorder is not None:  # the CPU: the graphs with the stand-in recorder
        tr.train_graphs = tr.make_train_graphs(recorder=recorder)
    return tr


def _rollout(seed, B=8, P=6, N=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 263, (B, P + N), generator=g)
    am = torch.ones(B, P + N, dtype=torch.long)
    am[: B // 2, : seed % 3] = 0  # left padding on some rows
    rmask = torch.ones(B, N, dtype=torch.long)
    rmask[B // 2:, N - 1 - seed % 2:] = 0  # shorter responses on others
    am[:, P:] = rmask
    f = lambda: torch.randn(B, N, generator=g) * rmask  # noqa: E731
    ro = Rollout(input_ids=ids, attention_mask=am, response_ids=ids[:, P:], response_mask=rmask, old_logp=f() - 5,
                 ref_logp=f() - 5, kl=f(), rewards=f(), advantages=f(), returns=f(), scores=torch.randn(B, generator=g),
                 values=f())
    return Rollout(**{f.name: getattr(ro, f.name).to(device) for f in dataclasses.fields(ro)})


def _state(tr):
    return [p.detach().clone() for o in tr._optimizers() for p in o.masters]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_updates_equal_eager_updates(dtype):
    """Four update() calls, each with other data: the same weights, fp32 masters and metrics as the eager path,
    bit for bit, whether a micro-batch ran eagerly, was captured or was replayed (bf16: the low-precision
    parameters' gradients moved into their fp32 masters by the optimizer's hook)."""
    eager, graph = _trainer(dtype), _trainer(dtype, recorder=ReplayByRerun())
    graph.actor.load_state_dict(eager.actor.state_dict())
    for step in range(4):  # (update() shuffles with the trainer's generator: the same seed in both)
        ro = _rollout(step)
        m_eager, m_graph = eager.update(ro), graph.update(ro)
        assert m_eager.keys() == m_graph.keys()
        for k in m_eager:
            assert torch.equal(torch.as_tensor(m_eager[k]), torch.as_tensor(m_graph[k])), (step, k)
        for a, b in zip(_state(eager), _state(graph)):
            assert torch.equal(a, b), step
        for a, b in zip(eager.actor.parameters(), graph.actor.parameters()):
            assert torch.equal(a, b), step
    counts = graph.train_graphs.counts
    # 2 micro-batches a minibatch, 2 minibatches an update: the first update eager, the second captures its shape
    # once and replays the rest, the later ones replay all
    assert counts == {"eager": 4, "captured": 1, "replayed": 11, "capture_failed": 0}, counts
    # the gradients stay allocated (zeroed) between updates: the graph accumulates into them
    assert all(m.grad is not None and not m.grad.any() for o in graph._optimizers() for m in o.masters)
    assert all(m.grad is None for o in eager._optimizers() for m in o.masters)


def test_new_shapes_run_eagerly_until_they_recur():
    """A response width seen for the first time runs eagerly (no capture for shapes that change every step);
    seen again in a later update() it is captured; the older shape's graph is kept meanwhile (LRU of 2)."""
    eager, graph = _trainer(torch.float32), _trainer(torch.float32, recorder=ReplayByRerun())
    graph.actor.load_state_dict(eager.actor.state_dict())
    counts = graph.train_graphs.counts
    for step, N in enumerate([5, 5, 4, 5, 4]):
        ro = _rollout(step, N=N)
        eager.update(ro), graph.update(ro)
        for a, b in zip(_state(eager), _state(graph)):
            assert torch.equal(a, b), step
    # N=5: eager x4, capture + 3 replays, (N=4 eager x4), 4 replays; N=4 then: capture + 3 replays
    assert counts == {"eager": 8, "captured": 2, "replayed": 10, "capture_failed": 0}, counts
    assert len(graph.train_graphs._graphs) == 2


def test_a_moved_parameter_or_gradient_drops_the_graphs():
    """A parameter given another tensor (``p.data = ...``) or a gradient dropped by hand: the captured addresses no
    longer hold what the graph reads and writes, so nothing is replayed; the update stays equal to the eager one."""
    eager, graph = _trainer(torch.float32), _trainer(torch.float32, recorder=ReplayByRerun())
    graph.actor.load_state_dict(eager.actor.state_dict())
    for step in range(2):
        ro = _rollout(step)
        eager.update(ro), graph.update(ro)
    assert graph.train_graphs._graphs
    counts = graph.train_graphs.counts
    assert counts["captured"] == 1
    p = next(graph.actor.parameters())
    p.data = p.data.clone()  # same values, another tensor
    ro = _rollout(2)
    eager.update(ro), graph.update(ro)
    for a, b in zip(_state(eager), _state(graph)):
        assert torch.equal(a, b)
    assert counts["captured"] == 2  # the old graph dropped, the shape captured again with the new tensor
    graph.optimizer.zero_grad()  # the gradients dropped: a replay would write into tensors no longer used
    ro = _rollout(3)
    eager.update(ro), graph.update(ro)
    for a, b in zip(_state(eager), _state(graph)):
        assert torch.equal(a, b)
    assert counts["captured"] == 3


def test_the_key_covers_the_loss_settings_and_the_model_state():
    """What a graph bakes in besides shapes: a loss coefficient changed between updates, a forward hook added, the
    recomputation turned off: each is a new key (eager, then captured in a later update), never a stale replay;
    returned metrics never share storage with the graph's outputs."""
    eager, graph = _trainer(torch.float32), _trainer(torch.float32, recorder=ReplayByRerun())
    graph.actor.load_state_dict(eager.actor.state_dict())
    tg = graph.train_graphs
    changes = [lambda t: None, lambda t: None, lambda t: setattr(t.cfg.ppo, "ent_coef", 0.05),
               lambda t: t.actor.model.layers[0].mlp.register_forward_hook(lambda *a: None),
               lambda t: setattr(t.actor, "gradient_checkpointing", True)]
    for step, change in enumerate(changes):
        change(eager), change(graph)
        before = dict(tg.counts)
        ro = _rollout(step)
        eager.update(ro), graph.update(ro)
        for a, b in zip(_state(eager), _state(graph)):
            assert torch.equal(a, b), step
        if step >= 2:  # a new key: all four micro-batches eager, no replay of the old graph
            assert tg.counts["eager"] - before["eager"] == 4 and tg.counts["replayed"] == before["replayed"], step
    m1 = tg.run(graph_part := _rollout(9).select(torch.arange(2)), torch.tensor(8.0), torch.tensor(4.0))
    tg.begin_update(graph._graph_consts())
    m2 = tg.run(graph_part, torch.tensor(8.0), torch.tensor(4.0))
    assert tg.counts["captured"] >= 1
    assert all(m1[k].data_ptr() != m2[k].data_ptr() for k in m1)


def test_pad_rollout_keeps_every_valid_token_and_the_layout():
    ro = _rollout(1, N=5)
    pr = pad_rollout(ro, 4, pad_id=0)
    assert pr.input_ids.shape == (8, 16) and pr.response_ids.shape == (8, 8)  # P 6 -> 8, N 5 -> 8
    assert torch.equal(pr.input_ids[:, 2:13], ro.input_ids) and torch.equal(pr.attention_mask[:, 2:13],
                                                                              ro.attention_mask)
    assert not pr.attention_mask[:, :2].any() and not pr.attention_mask[:, 13:].any()
    for name in ("response_ids", "response_mask", "old_logp", "ref_logp", "kl", "rewards", "advantages", "values",
                 "returns"):
        assert torch.equal(getattr(pr, name)[:, :5], getattr(ro, name)), name
        assert not getattr(pr, name)[:, 5:].any(), name
    assert pr.scores is ro.scores and pad_rollout(ro, 1, 0) is ro
    capped = pad_rollout(ro, 4, 0, max_prompt=7, max_response=6)  # never past the widest possible widths
    assert capped.input_ids.shape == (8, 13) and capped.response_ids.shape == (8, 6)
    assert pad_rollout(ro, 64, 0, max_prompt=6, max_response=5) is ro  # already as wide as they get
    with pytest.raises(ValueError, match="multiple"):
        pad_rollout(ro, 0, 0)


def test_padded_updates_equal_unpadded_ones_and_make_shapes_recur():
    """``ppo.train_cuda_graph_pad``: the update on masked, padded widths equals the unpadded one up to the
    roundings of longer rows (AdamW scales an update to ~lr whatever the gradient: a near-zero gradient's rounding
    can move a weight by a fraction of lr, hence the weights' looser bound); and response widths 5 and 4 pad to one
    shape, so the second update already replays."""
    plain, padded = _trainer(torch.float32), _trainer(torch.float32, recorder=ReplayByRerun(), pad=8)
    padded.actor.load_state_dict(plain.actor.state_dict())
    for step, N in enumerate([5, 4, 5]):
        ro = _rollout(step, N=N)
        m_plain, m_padded = plain.update(ro), padded.update(ro)
        for k in m_plain:
            torch.testing.assert_close(torch.as_tensor(m_padded[k]), torch.as_tensor(m_plain[k]), atol=1e-6,
                                       rtol=1e-5)
        for a, b in zip(_state(plain), _state(padded)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)  # lr = 1e-3
    assert padded.train_graphs.counts == {"eager": 4, "captured": 1, "replayed": 7, "capture_failed": 0}


class FailingCapture(ReplayByRerun):
    """A capture that raises midway, as an op that cannot be captured does: the aborted backward has given a
    low-precision parameter a gradient that was never computed (its hook to the fp32 master did not run)."""

    def __init__(self, params=()):
        self.params = params

    def record(self, fn):
        for p in self.params:
            if getattr(p, "_rlhf_master", None) is not None:
                p.grad = torch.full_like(p, float("nan"))
                break
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_failed_capture_leaves_the_shape_eager(dtype):
    """A capture that raises (an op that cannot be captured): one warning, the update finishes equal to the eager one
    (the warm-up's gradients counted once, the aborted capture's left on a parameter dropped), and that shape is
    never tried again."""
    eager, graph = _trainer(dtype), _trainer(dtype, recorder=ReplayByRerun())
    graph.train_graphs.recorder = FailingCapture([p for o in graph._optimizers() for p in o.params])
    graph.actor.load_state_dict(eager.actor.state_dict())
    for step in range(4):
        ro = _rollout(step)
        if step == 1:
            with pytest.warns(RuntimeWarning, match="capturing a micro-batch failed"):
                graph.update(ro)
        else:
            graph.update(ro)
        eager.update(ro)
        for a, b in zip(_state(eager), _state(graph)):
            assert torch.equal(a, b), step
    assert graph.train_graphs.counts == {"eager": 15, "captured": 0, "replayed": 0, "capture_failed": 1}


def test_train_cuda_graph_needs_cuda_and_a_bool():
    with pytest.raises(ValueError, match="ppo.train_cuda_graph: needs a CUDA device"):
        _trainer(torch.float32, graph=True)
    with pytest.raises(TypeError, match="ppo.train_cuda_graph: expected true or false"):
        _cfg(graph="yes")
    with pytest.raises(ValueError, match="max_graphs"):
        TrainGraphs(lambda *a: None, [], recorder=ReplayByRerun(), max_graphs=0)


@pytest.mark.gpu
def test_cuda_graph_updates_match_eager_gpu():
    """On a GPU with the real capture (bf16, triton backend, the one-node recomputed layers): three update() calls
    with and without ``ppo.train_cuda_graph`` give the same fp32 masters (the replays run the eager path's
    kernels on the same inputs: equal up to the non-deterministic order of atomic adds, if any kernel has them)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")

    def model(seed):
        from rlhf_engine.model import CausalLM, preset

        torch.manual_seed(seed)
        lm = CausalLM(preset("tiny-qwen2", vocab_size=263, eos_token_id=2, pad_token_id=0, bos_token_id=1))
        lm.gradient_checkpointing = True  # the one-node recomputed layers, as the PPO benchmark trains
        return lm.to(dev, torch.bfloat16)

    def make(graph):
        return PPOTrainer(_cfg("cuda", graph), model(0), byte_tokenizer(), lambda p, r: [0.0] * len(r),
                          critic=separate_critic(model(1)), device=dev)

    eager, graph = make(False), make(True)
    graph.actor.load_state_dict(eager.actor.state_dict())
    graph.critic.load_state_dict(eager.critic.state_dict())
    for step in range(3):
        ro = _rollout(step, device=dev)
        m_eager, m_graph = eager.update(ro), graph.update(ro)
        for k in m_eager:
            torch.testing.assert_close(torch.as_tensor(m_graph[k]).float().cpu(),
                                       torch.as_tensor(m_eager[k]).float().cpu(), atol=1e-5, rtol=1e-4)
        for a, b in zip(_state(eager), _state(graph)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert graph.train_graphs.counts["replayed"] >= 6, graph.train_graphs.counts
