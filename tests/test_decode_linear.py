"""The split-K decode GEMM (kernels/norm_linear.py ``decode_linear``): plain, with the residual add and the sums of
squares in its epilogue, and with a norm whose rstd comes from a previous call's partial sums; against fp64 and the
eager ops, at every split count (including more splits than K blocks, and one), over several M tiles; the split
sum deterministic and the tile counters back at zero after each launch; a decode layer chained as the model runs it;
bad inputs rejected. The interpreter runs fp32 and fp16 (its bf16 dots are wrong); bf16 runs on the GPU."""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels import _launch
from rlhf_engine.kernels import norm_linear as nl
from rlhf_engine.kernels.norm_linear import decode_linear, decode_linear_reference
from tiny import DTYPES_16, reversed_programs, rms_norm_fp64

TILES = [dict(BLOCK_N=16, BLOCK_K=32, SPLITS=1), dict(BLOCK_N=16, BLOCK_K=32, SPLITS=2),
         dict(BLOCK_N=32, BLOCK_K=16, SPLITS=4), dict(BLOCK_N=16, BLOCK_K=64, SPLITS=8)]


def _rand(g, *shape, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _fp64(x, w, b=None, g=None, eps=1e-6, r=None, ro=None, swiglu=False):
    s = x.double() if r is None else x.double() + r.double()
    h = s if g is None else rms_norm_fp64(s, g, eps)
    out = F.linear(h, w.double(), None if b is None else b.double())
    if swiglu:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out if ro is None else out + ro.double()


def _counters_zero():
    return all(int(c.abs().sum()) == 0 for c in _launch._COUNTERS.values())


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"n{t['BLOCK_N']}k{t['BLOCK_K']}s{t['SPLITS']}")
@pytest.mark.parametrize("M,K,N", [(1, 80, 40), (37, 130, 70), (64, 96, 33)])
def test_plain_and_residual_epilogue_match_fp64(tile, M, K, N, device):
    """out = ro + x Wᵀ + b at each split count, and the sums of squares of out as per-N-tile partials."""
    g = torch.Generator().manual_seed(M + K)
    x, w = _rand(g, M, K, device=device), _rand(g, N, K, scale=K ** -0.5, device=device)
    b, ro = _rand(g, N, scale=0.5, device=device), _rand(g, M, N, device=device)
    plain = decode_linear(x, w, b, backend="triton", tile=tile)
    torch.testing.assert_close(plain.out.double(), _fp64(x, w, b), atol=2e-5, rtol=2e-5)
    assert plain.s is None and plain.sumsq is None
    r = decode_linear(x, w, b, out_residual=ro, return_sumsq=True, backend="triton", tile=tile)
    exact = _fp64(x, w, b, ro=ro)
    torch.testing.assert_close(r.out.double(), exact, atol=2e-5, rtol=2e-5)
    assert r.sumsq.shape == (-(-N // tile["BLOCK_N"]), M) and r.sumsq.dtype == torch.float32
    torch.testing.assert_close(r.sumsq.double().sum(0), r.out.double().pow(2).sum(-1), atol=1e-4, rtol=1e-5)
    assert _counters_zero()


@pytest.mark.parametrize("tile", TILES[1:3], ids=lambda t: f"s{t['SPLITS']}")
@pytest.mark.parametrize("swiglu,bias", [(False, True), (True, False)])
def test_norm_from_partial_sums_matches_full_rows(tile, swiglu, bias, device):
    """A norm whose rstd comes from row_sumsq (a previous call's partials) equals the norm computed over the rows,
    and fp64; the prologue residual s = x + r is the eager add bit for bit."""
    g = torch.Generator().manual_seed(7)
    M, K, N = 21, 96, 40
    h_in, w0 = _rand(g, M, 64, device=device), _rand(g, K, 64, scale=0.125, device=device)
    ro, nw = _rand(g, M, K, device=device), (1 + 0.2 * torch.randn(K, generator=g)).to(device)
    w = _rand(g, 2 * N if swiglu else N, K, scale=K ** -0.5, device=device)
    b = _rand(g, N, scale=0.5, device=device) if bias else None
    prev = decode_linear(h_in, w0, out_residual=ro, return_sumsq=True, backend="triton", tile=tile)  # s, its sums
    via_sums = decode_linear(prev.out, w, b, norm_weight=nw, row_sumsq=prev.sumsq, swiglu=swiglu, backend="triton",
                             tile=tile)
    via_rows = decode_linear(prev.out, w, b, norm_weight=nw, swiglu=swiglu, backend="triton", tile=tile)
    exact = _fp64(prev.out, w, b, g=nw, swiglu=swiglu)
    torch.testing.assert_close(via_sums.out.double(), exact, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(via_sums.out, via_rows.out, atol=2e-5, rtol=2e-5)
    x, r = _rand(g, M, K, device=device), _rand(g, M, K, device=device)
    with_res = decode_linear(x, w, b, norm_weight=nw, residual=r, swiglu=swiglu, backend="triton", tile=tile)
    assert torch.equal(with_res.s, x + r)
    torch.testing.assert_close(with_res.out.double(), _fp64(x, w, b, g=nw, r=r, swiglu=swiglu), atol=3e-5,
                               rtol=3e-5)


def test_split_sum_is_the_partials_in_split_order_and_counters_reset(device):
    """The last program of a tile sums the fp32 partials in split order, whichever program finishes last: the output
    equals, bit for bit, the per-split products (each an unsplit launch over its K range) added in that order, launch
    after launch (20 on a GPU, where the programs finish in varying order); the tile counters are zero after each
    launch (a CUDA graph replays the launch with them as they are)."""
    g = torch.Generator().manual_seed(3)
    M, K, N, bk, splits = 50, 256, 48, 32, 8
    x, w = _rand(g, M, K, device=device), _rand(g, N, K, scale=1 / 16, device=device)
    tile = dict(BLOCK_N=16, BLOCK_K=bk, SPLITS=splits)
    per = K // splits  # one K block a split here
    parts = [decode_linear(x[:, s * per:(s + 1) * per].contiguous(), w[:, s * per:(s + 1) * per].contiguous(),
                           backend="triton", tile=dict(tile, SPLITS=1)).out for s in range(splits)]
    want = parts[0]
    for part in parts[1:]:
        want = want + part
    for i in range(20 if device.type == "cuda" else 2):
        with reversed_programs() if i % 2 else contextlib.nullcontext():  # interpreter: the other split sums
            r = decode_linear(x, w, return_sumsq=True, backend="triton", tile=tile)
        assert torch.equal(r.out, want)
        assert _counters_zero()


def test_rows_over_several_m_tiles(device):
    """150 rows: three M tiles of 64, each with its own counters, partials and sums of squares."""
    g = torch.Generator().manual_seed(4)
    x, w, ro = _rand(g, 150, 80, device=device), _rand(g, 40, 80, scale=0.1, device=device), _rand(g, 150, 40,
                                                                                                    device=device)
    r = decode_linear(x, w, out_residual=ro, return_sumsq=True, backend="triton",
                      tile=dict(BLOCK_N=16, BLOCK_K=16, SPLITS=4))
    torch.testing.assert_close(r.out.double(), _fp64(x, w, ro=ro), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(r.sumsq.double().sum(0), r.out.double().pow(2).sum(-1), atol=1e-4, rtol=1e-5)


def _layer(x, ro, p, backend, tile=None):
    """A decode layer's four projections chained as the model's norm-GEMM path runs them: norm+q/k/v (rstd from the
    partial sums), o + residual (sums out), norm+gate/up+SwiGLU (rstd from those), down + residual (sums out)."""
    lin = (decode_linear_reference if backend == "fp64"  # the reference's ops in fp64 (decode_linear: 16/32-bit)
           else functools.partial(decode_linear, backend=backend, tile=tile))
    first = lin(x, p["o"], out_residual=ro, return_sumsq=True)  # the previous layer's end
    qkv = lin(first.out, p["qkv"], p["qkv_b"], norm_weight=p["n1"], row_sumsq=first.sumsq).out
    attn = qkv[:, :x.shape[1]]  # stands in for attention: any (M, Dq) function of q/k/v
    mid = lin(attn, p["o"], out_residual=first.out, return_sumsq=True)
    act = lin(mid.out, p["gu"], norm_weight=p["n2"], row_sumsq=mid.sumsq, swiglu=True).out
    return lin(act, p["down"], out_residual=mid.out, return_sumsq=True).out


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES_16])
def test_decode_layer_chain_matches_eager(dtype, device):
    """The chained layer against the eager ops in the same dtype and fp64 (fp32: close; 16-bit: the error against
    fp64 at most 2x the eager ops' own)."""
    g = torch.Generator().manual_seed(5)
    M, H, Dkv, F_ = 64, 128, 32, 160
    p = dict(qkv=_rand(g, H + 2 * Dkv, H, scale=H ** -0.5), qkv_b=_rand(g, H + 2 * Dkv, scale=0.2),
             o=_rand(g, H, H, scale=H ** -0.5), gu=_rand(g, 2 * F_, H, scale=H ** -0.5),
             down=_rand(g, H, F_, scale=F_ ** -0.5), n1=1 + 0.2 * torch.randn(H, generator=g),
             n2=1 + 0.2 * torch.randn(H, generator=g))
    x, ro = _rand(g, M, H), _rand(g, M, H)
    exact = _layer(x.double(), ro.double(), {k: v.double() for k, v in p.items()}, "fp64").to(device)
    p = {k: v.to(device, dtype) for k, v in p.items()}
    x, ro = x.to(device, dtype), ro.to(device, dtype)
    with reversed_programs():  # under the interpreter: the programs in reverse order (the first split sums)
        ours = _layer(x, ro, p, "triton", tile=dict(BLOCK_N=32, BLOCK_K=32, SPLITS=2) if not x.is_cuda else None)
    eager = _layer(x, ro, p, "torch")
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), exact, atol=1e-4, rtol=1e-4)
    else:
        err, err_eager = (ours.double() - exact).abs().max().item(), (eager.double() - exact).abs().max().item()
        assert err <= 2 * err_eager + 1e-6, (err, err_eager)


def test_reference_sums_and_torch_backend():
    g = torch.Generator().manual_seed(6)
    x, w, ro = _rand(g, 5, 24), _rand(g, 8, 24), _rand(g, 5, 8)
    r = decode_linear(x, w, out_residual=ro, return_sumsq=True, backend="torch")
    ref = decode_linear_reference(x, w, out_residual=ro, return_sumsq=True)
    assert torch.equal(r.out, ref.out) and r.sumsq.shape == (1, 5)
    torch.testing.assert_close(r.sumsq, (ro + F.linear(x, w)).pow(2).sum(-1)[None])


def test_default_config_spreads_qwen_shapes_over_the_sms():
    """Without autotuning, Qwen2-0.5B's decode GEMMs at batch 64 on 132 SMs get >= 132 programs each, <= 8 splits
    of >= 1 K block."""
    for N, K, swiglu in [(1152, 896, False), (896, 896, False), (4864, 896, True), (896, 4864, False)]:
        c = nl.default_config(64, N, K, swiglu, 132).kwargs
        n_tiles, splits, m_tiles = nl.grid_for(64, N, K, 64, c)
        assert n_tiles * splits >= 132 and splits <= 8 and m_tiles == 1, (N, K, c)


def test_bad_inputs_raise(device):
    g = torch.Generator().manual_seed(8)
    x, w, nw = _rand(g, 4, 32, device=device), _rand(g, 8, 32, device=device), torch.ones(32, device=device)
    sq = torch.ones(2, 4, device=device)
    with pytest.raises(ValueError, match="row_sumsq"):
        decode_linear(x, w, row_sumsq=sq, backend="triton")  # no norm to feed
    with pytest.raises(ValueError, match="row_sumsq"):
        decode_linear(x, w, norm_weight=nw, row_sumsq=sq[:, :3], backend="triton")
    with pytest.raises(TypeError, match="row_sumsq"):
        decode_linear(x, w, norm_weight=nw, row_sumsq=sq.double(), backend="triton")
    with pytest.raises(ValueError, match="out_residual"):
        decode_linear(x, w, out_residual=x, backend="triton")
    with pytest.raises(TypeError, match="weight"):
        decode_linear(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="tile"):
        decode_linear(x, w, backend="triton", tile=dict(BLOCK_N=16, BLOCK_K=32, SPLITS=16))
    with pytest.raises(ValueError, match="tile"):
        decode_linear(x, w, backend="triton", tile=dict(BLOCK_N=24, BLOCK_K=32, SPLITS=2))
    with pytest.raises(ValueError, match="K >= 1"):
        decode_linear(x[:, :0], w[:, :0], backend="triton")


@pytest.mark.gpu
def test_cuda_graphs_and_pdl_gpu(monkeypatch):
    """On a GPU: the tile counters are not made inside a capture (it would record their zero fill without running
    it); after one eager call, two graphs captured with the same counters replay right in either order; launches
    with programmatic dependent launch (the default on Hopper) give the bits of launches without it."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(9)
    x, w = _rand(g, 64, 896, dtype=torch.bfloat16, device=dev), _rand(g, 1152, 896, scale=0.03, dtype=torch.bfloat16,
                                                                        device=dev)
    ro = _rand(g, 64, 1152, dtype=torch.bfloat16, device=dev)

    def call():  # as the model's decode layers launch it: PDL where the device allows (RLHF_ENGINE_PDL=0: not)
        return decode_linear(x, w, out_residual=ro, return_sumsq=True, backend="triton", pdl=True)

    monkeypatch.setattr(_launch, "_COUNTERS", {})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"):
        with torch.cuda.graph(graph):
            call()
    want = call()  # eager: makes the counters
    monkeypatch.setenv("RLHF_ENGINE_PDL", "0")
    plain = call()
    monkeypatch.delenv("RLHF_ENGINE_PDL")
    assert torch.equal(want.out, plain.out) and torch.equal(want.sumsq, plain.sumsq)
    graphs, outs = [], []
    for _ in range(2):
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            outs.append(call())
        graphs.append(gr)
    for i in (1, 0, 1):
        outs[i].out.zero_()
        graphs[i].replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[i].out, want.out)
    assert _counters_zero()


def test_empty_batch(device):
    x, w = torch.zeros(0, 32, device=device), torch.zeros(8, 32, device=device)
    r = decode_linear(x, w, return_sumsq=True, backend="triton")
    assert r.out.shape == (0, 8) and r.sumsq.shape[1] == 0
