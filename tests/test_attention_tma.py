"""The opt-in TMA variant of the attention forward (``kernels/attention_fwd_tma.py``) against the fp64 reference
and the pointer kernel; its eligibility rules; and the ``RLHF_ENGINE_ATTN_TMA`` switch through flash_attention.
Tensor descriptors run under the Triton interpreter on the CPU (fp32, small tiles); bf16 and timing on a GPU."""
import pytest
import torch

from rlhf_engine.kernels.attention import flash_attention
from rlhf_engine.kernels.attention_fwd import attention_forward
from rlhf_engine.kernels.attention_fwd_tma import attention_forward_tma, tma_eligible
from rlhf_engine.kernels.reference.attention import attention_reference
from tiny import key_ranges


# (B, T, Hq, Hkv, D, causal, padding, block_m, block_n)
CASES = [
    (2, 97, 9, 3, 64, True, "none", 32, 64),
    (3, 41, 4, 2, 64, True, "left", 32, 32),
    (2, 50, 4, 4, 128, False, "right", 16, 32),
    (3, 33, 14, 2, 64, False, "left", 64, 16),
    (2, 1, 4, 2, 128, True, "none", 16, 16),
]


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding,bm,bn", CASES)
def test_tma_forward_matches_reference_and_pointer_kernel(B, T, Hq, Hkv, D, causal, padding, bm, bn, flat, device,
                                                          monkeypatch):
    """flat: the 1-D launch taken past 65535 (batch, head) rows (FLAT_GRID), here with the limit lowered to 1."""
    if flat:
        from rlhf_engine.kernels import attention_fwd

        monkeypatch.setattr(attention_fwd, "MAX_GRID_ROWS", 1)
    torch.manual_seed(0)
    q = torch.randn(B, T, Hq, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    v = torch.randn(B, T, Hkv, D, device=device)
    ks, ke = key_ranges(padding, B, T, device)
    scale = D ** -0.5
    assert tma_eligible(q, k, v)
    o, lse = attention_forward_tma(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale,
                                   block_m=bm, block_n=bn)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, kv_start=ks, kv_end=ke,
                              softmax_scale=scale)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    o_ptr, lse_ptr = attention_forward(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale,
                                       block_m=bm, block_n=bn)
    torch.testing.assert_close(o, o_ptr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse_ptr, atol=1e-6, rtol=1e-6, equal_nan=True)  # -inf on empty rows


def test_tma_forward_ignores_nan_outside_the_key_range(device):
    """Boxes read whole tiles: keys outside [kv_start, kv_end) (here NaN, as in an unwritten cache slot) must not
    reach the output (masked scores, zeroed V rows)."""
    B, T, Hq, Hkv, D = 2, 45, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, device=device) for h in (Hq, Hkv, Hkv))
    ks, ke = key_ranges("left", B, T, device)
    for b in range(B):
        k[b, : ks[b]] = float("nan")
        v[b, : ks[b]] = float("nan")
    o, _ = attention_forward_tma(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=0.125,
                                 block_m=16, block_n=32)
    assert not torch.isnan(o).any()
    ref = attention_reference(q.double(), torch.nan_to_num(k).double(), torch.nan_to_num(v).double(), causal=True,
                              kv_start=ks, kv_end=ke, softmax_scale=0.125)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)


def test_eligibility(device):
    q = torch.randn(2, 8, 4, 64, device=device)
    assert tma_eligible(q, q[:, :, :2], q[:, :, 2:])  # head slices of one tensor: rows of a (B, T, H * D) view
    bhtd = torch.randn(2, 4, 8, 64, device=device).transpose(1, 2)  # (B, T, H, D) over a (B, H, T, D) layout
    assert not tma_eligible(bhtd, q[:, :, :2], q[:, :, :2])  # heads not packed: stride(2) != D
    x = torch.randn(2, 8, 4, 80, device=device)
    assert not tma_eligible(x, x, x)  # D = 80: the box cannot cover exactly one head
    t = torch.randn(2, 8, 4, 2 * 64, device=device)[..., ::2]
    assert not tma_eligible(t, t, t)  # no unit stride on D
    kv = torch.randn(1, 8, 2, 64, device=device).expand(2, 8, 2, 64)
    assert not tma_eligible(q, kv, kv)  # a broadcast batch (stride 0): boxes of one row would overlap


def test_env_switch_through_flash_attention(device, monkeypatch):
    """RLHF_ENGINE_ATTN_TMA=1: flash_attention's forward runs the TMA kernel (and its backward, fed by the same
    o and lse, gives the reference gradients)."""
    from rlhf_engine.kernels import attention_fwd_tma

    calls = []
    orig = attention_fwd_tma.attention_forward_tma
    monkeypatch.setattr(attention_fwd_tma, "attention_forward_tma", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    monkeypatch.setenv("RLHF_ENGINE_ATTN_TMA", "1")
    B, T, Hq, Hkv, D = 2, 29, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, device=device, requires_grad=True) for h in (Hq, Hkv, Hkv))
    ks, ke = key_ranges("right", B, T, device)
    o = flash_attention(q, k, v, causal=True, kv_start=ks, kv_end=ke, backend="triton")
    assert calls == [1]
    g = torch.randn_like(o)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_tma_forward_bf16_gpu(D, padding, record_value):
    """bf16 on an H100 (real TMA): the TMA forward against fp64, within 2x of the pointer kernel's own error, and
    the same log-sum-exp (what the backward reads)."""
    torch.manual_seed(0)
    B, T, Hq, Hkv = 2, 1025, 14, 2
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    ks, ke = key_ranges(padding, B, T, "cuda")
    o_tma, lse_tma = attention_forward_tma(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
    o_ptr, lse_ptr = attention_forward(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, kv_start=ks, kv_end=ke,
                              softmax_scale=D ** -0.5)
    assert not torch.isnan(o_tma).any()
    err_tma, err_ptr = ((o.double() - ref).abs().max().item() for o in (o_tma, o_ptr))
    record_value(f"TMA forward D={D} {padding}: max err vs fp64 (TMA / pointer kernel)",
                 f"{err_tma:.3g} / {err_ptr:.3g}")
    assert err_tma <= 2 * err_ptr + 1e-3
    finite = torch.isfinite(lse_ptr)
    torch.testing.assert_close(lse_tma[finite], lse_ptr[finite], atol=1e-3, rtol=1e-3)
