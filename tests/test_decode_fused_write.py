"""The decode attention kernel writing the new tokens' K/V into the cache itself (``decode_attention(kv_write=...)``):
against write_kv_cache + decode_attention, at one split and several (each slot written by the program whose chunk
reads it), with the programs in reverse order under the interpreter, and on the GPU with CUDA graphs. Split from
test_decode_attention.py."""
import contextlib

import pytest
import torch

from rlhf_engine.kernels.decode_attention import decode_attention
from rlhf_engine.kernels.kv_cache import write_kv_cache
from tiny import nan_padded_cache, reversed_programs


# ----------------------------------------------------------------------------- the cache write fused in
def _kv_write_case(B, L, Hq, Hkv, D, Tn, rope, with_start, device, dtype=torch.float32):
    """Caches whose slots from each row's write position on hold NaN (written before they are read, or never read),
    the new tokens, queries, RoPE tables (none, full (B, Tn, D) or half (B, Tn, D/2)) and the write positions: row 0
    writes past the cache's end (its last slot is dropped), row 2 from slot -1 (its first is dropped)."""
    write_pos = torch.tensor([L - Tn + 1] + [min(20 + 3 * b, L - Tn) for b in range(1, B - 1)] + [-1],
                             dtype=torch.int32, device=device)
    lens = torch.clamp(write_pos + Tn, 0, L)
    start = torch.tensor([0] + [5] * (B - 2) + [0], dtype=torch.int32, device=device) if with_start else None
    k0, v0 = nan_padded_cache(B, L, Hkv, D, dtype, device, torch.clamp(write_pos, min=0), start)
    k_new = torch.randn(B, Tn, Hkv, D, device=device, dtype=dtype)
    v_new = torch.randn(B, Tn, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, Tn, Hq, D, device=device, dtype=dtype)
    cos = sin = None
    if rope != "none":
        ang = torch.rand(B, Tn, D // 2, device=device) * 6.28
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        if rope == "full":
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return k0, v0, k_new, v_new, q, cos, sin, write_pos, lens, start


def _separate_write(k, v, k_new, v_new, write_pos, cos, sin):
    """The model's unfused path: write_kv_cache with the (B * Tn, D/2) tables at rows b * Tn."""
    B, Tn, _, D = k_new.shape
    rows = torch.arange(0, B * Tn, Tn, device=k.device, dtype=torch.int32)
    write_kv_cache(k, v, k_new, v_new, write_pos,
                   cos=None if cos is None else cos[..., : D // 2].reshape(B * Tn, -1),
                   sin=None if sin is None else sin[..., : D // 2].reshape(B * Tn, -1),
                   rope_positions=None if cos is None else rows, backend="triton")


@pytest.mark.parametrize("Tn", [1, 2])
@pytest.mark.parametrize("rope", ["none", "full", "half"])
@pytest.mark.parametrize("with_start", [False, True])
@pytest.mark.parametrize("D", [16, 80])
def test_kv_write_fused_equals_write_then_attend(Tn, rope, with_start, D, device, monkeypatch):
    """decode_attention(kv_write=...) writes K (rotated with the query's tables) and V inside the attention kernel:
    the caches and the output equal write_kv_cache + decode_attention's (bit for bit under the interpreter; on a
    GPU to an fp32 rounding: the two kernels may contract their multiply-adds differently), and no separate write
    runs. With splits each slot is written by the program whose chunk reads it (2, 3 and 12 splits: chunks of
    whole blocks, some empty; 12 also leaves the combine to the reduce kernel), the same caches; with the torch
    backend the write runs first."""
    from rlhf_engine.kernels import decode_attention as da

    B, L, Hq, Hkv = 3, 40, 6, 2
    k0, v0, k_new, v_new, q, cos, sin, write_pos, lens, start = _kv_write_case(B, L, Hq, Hkv, D, Tn, rope,
                                                                                with_start, device)
    k_ref, v_ref = k0.clone(), v0.clone()
    _separate_write(k_ref, v_ref, k_new, v_new, write_pos, cos, sin)
    o_ref = decode_attention(q, k_ref, v_ref, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=1,
                             backend="triton")
    assert not torch.isnan(o_ref).any()

    def no_separate_write(*a, **kw):
        raise AssertionError("the fused path ran a separate cache write")

    with monkeypatch.context() as mp:  # one launch: the attention kernel writes
        mp.setattr(da, "write_kv_cache", no_separate_write)
        k1, v1 = k0.clone(), v0.clone()
        o1 = decode_attention(q, k1, v1, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=1,
                              kv_write=(k_new, v_new, write_pos), backend="triton")
    tol = dict(atol=0, rtol=0) if device.type == "cpu" else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k1, k_ref, equal_nan=True, **tol)  # unwritten slots hold NaN (never read)
    torch.testing.assert_close(v1, v_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(o1, o_ref, **tol)
    for splits, backend, rev in ((2, "triton", False), (3, "triton", True), (12, "triton", True),
                                 (None, "torch", False)):
        with monkeypatch.context() as mp, reversed_programs() if rev else contextlib.nullcontext():
            if backend == "triton":
                mp.setattr(da, "write_kv_cache", no_separate_write)
            k2, v2 = k0.clone(), v0.clone()
            o2 = decode_attention(q, k2, v2, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=splits,
                                  kv_write=(k_new, v_new, write_pos), backend=backend)
        torch.testing.assert_close(k2, k_ref, equal_nan=True, **(tol if backend == "triton" else
                                                                 dict(atol=1e-6, rtol=1e-6)))
        torch.testing.assert_close(v2, v_ref, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(o2, o_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 3, 5])
def test_kv_write_with_splits_outside_the_read_range(splits, device):
    """Write positions that are not the last Tn slots: ahead of cache_lens (slots nobody reads, written by split
    0), inside the valid range (written by the split whose chunk holds them, which then reads them) and before
    cache_start; with the programs in reverse order under the interpreter (split 0 last). The caches equal
    write_kv_cache's and the output equals the attention over the cache it wrote."""
    B, L, Hq, Hkv, D, Tn = 3, 96, 6, 2, 16, 2
    lens = torch.tensor([60, 90, 40], dtype=torch.int32, device=device)
    start = torch.tensor([0, 10, 30], dtype=torch.int32, device=device)
    write_pos = torch.tensor([70, 33, 25], dtype=torch.int32, device=device)  # ahead; inside; across cache_start
    k0 = torch.randn(B, L, Hkv, D, device=device)
    v0 = torch.randn(B, L, Hkv, D, device=device)
    k_new, v_new = torch.randn(B, Tn, Hkv, D, device=device), torch.randn(B, Tn, Hkv, D, device=device)
    q = torch.randn(B, Tn, Hq, D, device=device)
    k_ref, v_ref = k0.clone(), v0.clone()
    write_kv_cache(k_ref, v_ref, k_new, v_new, write_pos, backend="triton")
    o_ref = decode_attention(q, k_ref, v_ref, lens, cache_start=start, num_splits=splits, backend="triton")
    k1, v1 = k0.clone(), v0.clone()
    with reversed_programs():
        o1 = decode_attention(q, k1, v1, lens, cache_start=start, num_splits=splits,
                              kv_write=(k_new, v_new, write_pos), backend="triton")
    assert torch.equal(k1, k_ref) and torch.equal(v1, v_ref)
    torch.testing.assert_close(o1, o_ref, atol=1e-6, rtol=1e-5)


def test_kv_write_validation(device):
    B, L, Hq, Hkv, D, Tn = 2, 8, 4, 2, 16, 1
    q = torch.randn(B, Tn, Hq, D, device=device)
    k, v = torch.zeros(B, L, Hkv, D, device=device), torch.zeros(B, L, Hkv, D, device=device)
    lens = torch.full((B,), 3, dtype=torch.int32, device=device)
    kn = torch.randn(B, Tn, Hkv, D, device=device)
    pos = lens - 1
    with pytest.raises(ValueError, match="kv_write"):
        decode_attention(q, k, v, lens, kv_write=(kn, kn), backend="triton")
    with pytest.raises(ValueError, match="k_new"):
        decode_attention(q, k, v, lens, kv_write=(kn[:, :, :1], kn, pos), backend="triton")
    with pytest.raises(ValueError, match="write_pos"):
        decode_attention(q, k, v, lens, kv_write=(kn, kn, pos[:1]), backend="triton")
    with pytest.raises(TypeError, match="write_pos"):
        decode_attention(q, k, v, lens, kv_write=(kn, kn, pos.float()), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("L, Tn, with_start", [(384, 1, False), (384, 2, True), (40, 1, True)])
def test_kv_write_fused_bf16_gpu_and_graph(L, Tn, with_start, splits, pdl, device, monkeypatch):
    """On the GPU, where the barrier between the kernel's cache stores and its loads is real: the slots written hold
    NaN before (a load that overtook its store would poison the output); the fused output equals, bit for bit, the
    plain attention over the cache the fused kernel wrote (one fixed tile for both: no autotuning), and the caches
    and output match write_kv_cache + decode_attention (bf16, Qwen2-0.5B's heads; short caches too, where the
    written slot is in the first block loaded after the barrier); then the same from a CUDA graph replayed at a
    later step. At 1, 2, 4 and 8 splits (each slot written by the program whose chunk reads it; the splits
    combined by the kernel's last program). With ``pdl`` the fused kernel is a programmatic dependent launch on
    Hopper (its prefetches before the wait), against the plain launch bit for bit."""
    monkeypatch.setenv("RLHF_ENGINE_AUTOTUNE", "0")
    B, Hq, Hkv, D = 64, 14, 2, 64
    k0, v0, k_new, v_new, q, cos, sin, write_pos, lens, start = _kv_write_case(
        B, L, Hq, Hkv, D, Tn, "half", with_start, device, dtype=torch.bfloat16)
    write_pos = torch.clamp(write_pos, 0, L - Tn)  # every row writes inside the cache (NaN slots get filled)
    lens = write_pos + Tn

    def separate(k, v):
        _separate_write(k, v, k_new, v_new, write_pos, cos, sin)
        return decode_attention(q, k, v, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=splits)

    def fused(k, v):
        return decode_attention(q, k, v, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=splits,
                                kv_write=(k_new, v_new, write_pos), pdl=pdl)

    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    o1, o2 = separate(k1, v1), fused(k2, v2)
    assert not torch.isnan(o2).any()
    plain = decode_attention(q, k2, v2, lens, cache_start=start, q_cos=cos, q_sin=sin, num_splits=splits)
    torch.testing.assert_close(o2, plain, atol=0, rtol=0)
    torch.testing.assert_close(v2, v1, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(k2.float(), k1.float(), atol=1e-2, rtol=1e-2, equal_nan=True)
    torch.testing.assert_close(o2.float(), o1.float(), atol=2e-2, rtol=2e-2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o3 = fused(k2, v2)
    write_pos.add_(Tn)  # a later step: the next slots (still NaN from k0, v0; row 0's are past the end), longer caches
    lens.add_(Tn)
    g.replay()
    assert not torch.isnan(o3).any()
    o4 = separate(k1, v1)
    torch.testing.assert_close(o3.float(), o4.float(), atol=2e-2, rtol=2e-2)
