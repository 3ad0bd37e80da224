"""LoRA: shared frozen base weights, adapters off = the base (reference) model, merging, saving."""
import pytest
import torch

from rlhf_engine.generation import generate
from rlhf_engine.model import (CausalLM, apply_lora, disable_adapters, load_pretrained, lora_parameters, merge_lora,
                               preset, save_pretrained, sequence_logprobs)
from rlhf_engine.model.batch_invariant import Linear, applies
from rlhf_engine.model.lora import LoRALinear, merged_state_dict


def _model(name: str = "tiny-llama") -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(preset(name, initializer_range=0.1)).eval()


def _batch(vocab: int):
    ids = torch.randint(3, vocab, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _train_adapters(m, ids, mask, steps: int = 3):
    opt = torch.optim.Adam(lora_parameters(m), lr=0.05)
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        (-sequence_logprobs(m, ids, mask, start=6).sum()).backward()
        opt.step()
    m.eval()


def test_apply_lora_shares_and_freezes_base():
    m = _model()
    base_ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    ids, mask = _batch(m.config.vocab_size)
    with torch.no_grad():
        before = m(ids, mask)
    apply_lora(m, rank=4, alpha=8.0)
    assert sum(isinstance(x, LoRALinear) for x in m.modules()) == 7 * m.config.num_layers
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.data_ptr() == base_ptrs[n], n  # same tensor, not a copy
    assert len(lora_parameters(m)) == 2 * 7 * m.config.num_layers
    assert "model.layers.0.self_attn.q_proj.weight" in m.state_dict()
    assert "model.layers.0.self_attn.q_proj.lora_A" in m.state_dict()
    with torch.no_grad():
        assert torch.equal(m(ids, mask), before)  # B = 0 at init


def test_disable_adapters_is_the_base_model():
    m = _model("tiny-qwen2")
    ids, mask = _batch(m.config.vocab_size)
    with torch.no_grad():
        base = m(ids, mask)
    apply_lora(m, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    _train_adapters(m, ids, mask)
    with torch.no_grad():
        adapted = m(ids, mask)
        with disable_adapters(m):
            ref = m(ids, mask)
        again = m(ids, mask)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(ref, base)
    assert torch.equal(again, adapted)


def test_merge_lora_and_save(tmp_path):
    m = _model()
    ids, mask = _batch(m.config.vocab_size)
    apply_lora(m, rank=2, alpha=4.0)
    _train_adapters(m, ids, mask)
    with torch.no_grad():
        adapted = m(ids, mask)
    sd = merged_state_dict(m)
    assert not [k for k in sd if "lora_" in k]
    save_pretrained(m, tmp_path / "merged")  # adapters folded into the saved weights
    loaded, _ = load_pretrained(tmp_path / "merged")
    merge_lora(m)
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    with torch.no_grad():
        assert (m(ids, mask) - adapted).abs().max() <= 1e-5
        assert (loaded(ids, mask) - adapted).abs().max() <= 1e-5


def test_generation_with_adapters_and_reference():
    """Rollouts run the adapted policy; the reference is the same module with adapters off."""
    m = _model()
    ids, mask = _batch(m.config.vocab_size)
    base_out = generate(m, ids, mask, max_new_tokens=6, greedy=True, eos_token_ids=())
    apply_lora(m, rank=4, alpha=16.0)
    _train_adapters(m, ids, mask, steps=5)
    out = generate(m, ids, mask, max_new_tokens=6, greedy=True, eos_token_ids=())
    lp = sequence_logprobs(m, out.sequences, out.attention_mask, start=out.prompt_len)
    assert ((lp - out.logprobs).abs() * out.response_mask).max() <= 1e-5
    with torch.no_grad(), disable_adapters(m):
        ref_lp = sequence_logprobs(m, base_out.sequences, base_out.attention_mask, start=base_out.prompt_len)
    assert (ref_lp - base_out.logprobs).abs().max() <= 1e-5


def test_lora_dtype_and_errors():
    m = _model()
    apply_lora(m, rank=2, alpha=2.0, target_modules=("o_proj",), dtype=torch.float64, freeze_base=False)
    assert m.model.layers[0].self_attn.o_proj.lora_A.dtype == torch.float64
    assert m.model.embed_tokens.weight.requires_grad  # freeze_base=False keeps the base trainable
    ids, mask = _batch(m.config.vocab_size)
    assert m(ids, mask).dtype == torch.float32
    with pytest.raises(ValueError, match="already"):
        apply_lora(m, rank=2, alpha=2.0, target_modules=("o_proj",))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(_model(), target_modules=("nope",))
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(_model(), target_modules=("lm_head",))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_model(), rank=0)


class _CountOps:
    """Names of the aten ops run inside the block (a TorchDispatchMode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.parametrize("base", [torch.nn.Linear, Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_term_is_one_addmm_with_and_without_autograd(dtype, base):
    """Adapters in the activations' dtype: the low-rank term is one addmm into the base output (3 kernels, not 5),
    in place without autograd and out of place with it: the same op, so the values are equal bit for bit (the
    PPO scoring forward and the training forward); it matches the two-GEMM definition up to one rounding. fp32
    adapters over a 16-bit base keep the general path. Over the model's Linear, fp32 on the CPU: the batch-invariant
    GEMMs and one add (model/batch_invariant.py), again the same ops with and without autograd."""
    torch.manual_seed(0)
    m = LoRALinear(base(48, 40), rank=4, alpha=8.0).to(dtype)
    assert m.batch_invariant == (base is Linear)  # the base layer's setting
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 5, 48, dtype=dtype)
    invariant = applies(x) and m.batch_invariant
    with _CountOps() as c:
        trained = m(x.clone().requires_grad_())
    assert ("add" in c.ops if invariant else "addmm" in c.ops and "add" not in c.ops) and "mul" not in c.ops, c.ops
    with torch.no_grad(), _CountOps() as c:
        scored = m(x)
    assert ("add_" if invariant else "addmm_") in c.ops and "mul" not in c.ops and "add" not in c.ops, c.ops
    assert torch.equal(scored, trained.detach())
    h = torch.nn.functional.linear(x.double(), m.lora_A.double())
    ref = torch.nn.functional.linear(x.double(), m.weight.double(), m.bias.double()) + \
        torch.nn.functional.linear(h, m.lora_B.double()) * m.scaling
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * ref.abs().max().item()
    torch.testing.assert_close(scored.double(), ref, atol=tol, rtol=0)
    (g,) = torch.autograd.grad(trained.sum(), m.lora_B)  # the addmm's gradient reaches the adapter
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    m32 = LoRALinear(torch.nn.Linear(48, 40).to(dtype), rank=4, alpha=8.0, dtype=torch.float32)
    with torch.no_grad(), _CountOps() as c:
        m32(x)
    if dtype != torch.float32:
        assert "addmm_" not in c.ops  # fp32 adapters over a 16-bit base: the general path casts


@pytest.mark.parametrize("attn_backend", ["torch", "triton"])
@pytest.mark.parametrize("freeze_base", [True, False])
def test_lora_scoring_forward_equals_training_forward(attn_backend, freeze_base, device):
    """A LoRA policy: log-probs without autograd (old log-probs) equal the training forward's bit for bit, on the
    fused (triton) path too, where generation packs the adapters but scoring must run them as training does."""
    m = _model("tiny-qwen2")
    apply_lora(m, rank=4, alpha=16.0, freeze_base=freeze_base)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.05)
    m.to(device)
    ids, mask = (t.to(device) for t in _batch(m.config.vocab_size))
    with torch.no_grad():
        scored = sequence_logprobs(m, ids, mask, start=6, attn_backend=attn_backend)
    trained = sequence_logprobs(m, ids, mask, start=6, attn_backend=attn_backend)
    assert trained.requires_grad and torch.equal(scored, trained.detach())
