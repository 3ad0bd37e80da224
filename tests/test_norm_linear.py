"""RMSNorm fused into the GEMM after it, with SwiGLU in the epilogue (kernels/norm_linear.py): against fp64 and the
unfused eager ops, on odd shapes, with and without the residual, the bias and the SwiGLU epilogue; 16-bit within
2x of the eager ops' own error; the residual sum bit for bit; bad inputs rejected. The interpreter runs fp32 and
fp16 (its bf16 dots are wrong); bf16 runs on the GPU."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels.norm_linear import MAX_ROWS, norm_linear_reference, rms_norm_linear
from tiny import DTYPES_16, rms_norm_fp64

# (leading shape, K, N): a decode batch of 1 and of odd sizes, K not a multiple of the K tile, Qwen2-0.5B-like
SHAPES = [((1, 1), 64, 48), ((37,), 96, 70), ((5, 3), 130, 33), ((64, 1), 896, 160)]


def _fp64(x, g, eps, w, b, r, swiglu):
    s = x.double() if r is None else x.double() + r.double()
    out = F.linear(rms_norm_fp64(s, g, eps), w.double(), None if b is None else b.double())
    if swiglu:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out


def _inputs(lead, K, N, swiglu, bias, residual, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    x = rnd(*lead, K, scale=2.0)
    r = rnd(*lead, K) if residual else None
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(device, dtype)
    w = rnd(2 * N if swiglu else N, K, scale=K ** -0.5)
    b = rnd(N, scale=0.5) if bias else None
    return x, r, nw, w, b


@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("swiglu,bias", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_matches_fp64(lead, K, N, swiglu, bias, residual, device):
    x, r, nw, w, b = _inputs(lead, K, N, swiglu, bias, residual, torch.float32, device)
    out, s = rms_norm_linear(x, nw, 1e-6, w, b, residual=r, swiglu=swiglu, backend="triton")
    assert out.shape == (*lead, N) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _fp64(x, nw, 1e-6, w, b, r, swiglu), atol=2e-5, rtol=2e-5)
    if residual:
        assert torch.equal(s, x + r)  # the eager add
    else:
        assert s is None


@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("swiglu,bias", [(False, True), (True, False)])
def test_16bit_error_within_2x_of_eager(dtype, swiglu, bias, device):
    """16-bit: the error against fp64 is at most 2x that of the unfused eager ops in the same dtype (which round
    y, the GEMM outputs and silu(gate) as this kernel does); the residual sum is the eager add bit for bit."""
    lead, K, N = (64,), 896, 160
    x, r, nw, w, b = _inputs(lead, K, N, swiglu, bias, True, dtype, device, seed=1)
    out, s = rms_norm_linear(x, nw, 1e-6, w, b, residual=r, swiglu=swiglu, backend="triton")
    ref, s_ref = norm_linear_reference(x, nw, 1e-6, w, b, residual=r, swiglu=swiglu)
    exact = _fp64(x, nw, 1e-6, w, b, r, swiglu)
    ours, eager = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ours <= 2 * eager + 1e-6, (ours, eager)
    assert torch.equal(s, s_ref)


def test_rows_tile_over_m(device):
    """More rows than one M tile (64): the programs of every M tile see their own rows and sums of squares."""
    x, r, nw, w, b = _inputs((150,), 80, 40, False, True, True, torch.float32, device, seed=2)
    out, _ = rms_norm_linear(x, nw, 1e-5, w, b, residual=r, backend="triton")
    torch.testing.assert_close(out.double(), _fp64(x, nw, 1e-5, w, b, r, False), atol=2e-5, rtol=2e-5)


def test_torch_backend_is_the_reference_and_matches_fp64():
    """The torch backend is the eager reference (the 16-bit test's yardstick), itself right against fp64."""
    x, r, nw, w, _ = _inputs((3,), 32, 8, True, False, True, torch.float32, "cpu")
    out, s = rms_norm_linear(x, nw, 1e-6, w, residual=r, swiglu=True, backend="torch")
    ref, s_ref = norm_linear_reference(x, nw, 1e-6, w, residual=r, swiglu=True)
    assert torch.equal(out, ref) and torch.equal(s, s_ref)
    torch.testing.assert_close(out.double(), _fp64(x, nw, 1e-6, w, None, r, True), atol=2e-5, rtol=2e-5)


def test_bad_inputs_raise(device):
    x, r, nw, w, b = _inputs((4,), 32, 8, False, True, True, torch.float32, device)
    with pytest.raises(TypeError, match="x:"):
        rms_norm_linear(x.long(), nw, 1e-6, w, backend="triton")
    with pytest.raises(TypeError, match="norm_weight"):
        rms_norm_linear(x, nw.double(), 1e-6, w, backend="triton")
    with pytest.raises(ValueError, match="norm_weight"):
        rms_norm_linear(x, nw[:-1], 1e-6, w, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        rms_norm_linear(x, nw, 1e-6, w[:, :-1], backend="triton")
    with pytest.raises(ValueError, match="weight"):
        rms_norm_linear(x, nw, 1e-6, w[:-1], swiglu=True, backend="triton")  # 7 rows: not gate + up halves
    with pytest.raises(ValueError, match="bias"):
        rms_norm_linear(x, nw, 1e-6, w, b[:-1], backend="triton")
    with pytest.raises(ValueError, match="bias"):
        rms_norm_linear(x, nw, 1e-6, w, b[:4], swiglu=True, backend="triton")
    with pytest.raises(ValueError, match="residual"):
        rms_norm_linear(x, nw, 1e-6, w, residual=r[:2], backend="triton")
    with pytest.raises(ValueError, match="eps"):
        rms_norm_linear(x, nw, float("nan"), w, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rms_norm_linear(x, nw, 1e-6, w, backend="cuda")
    big = torch.zeros(MAX_ROWS + 1, 32, device=device)
    with pytest.raises(ValueError, match="rows"):
        rms_norm_linear(big, nw, 1e-6, w, backend="triton")


def test_empty_batch(device):
    x, _, nw, w, b = _inputs((0,), 32, 8, False, True, False, torch.float32, device)
    out, s = rms_norm_linear(x, nw, 1e-6, w, b, backend="triton")
    assert out.shape == (0, 8) and s is None
