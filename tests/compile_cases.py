"""The sm_90 compile cases of ``test_triton_compile.py`` (a case, and those of the Gluon kernels: the
warp-specialized attention forward and backward, the decode GEMM and its LM-head sampling epilogue)."""
import pytest


def case(cid, module, kernel, ptrs, floats, constexprs, num_warps, num_stages=3, descs=None):
    """descs: {argument: "tensordesc<dtype[box shape]>"} for tensor-descriptor (TMA) arguments."""
    return pytest.param(dict(module=f"rlhf_engine.kernels.{module}", kernel=kernel, ptrs=ptrs, floats=floats,
                             constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                             descs=descs or {}), id=cid)


def _attention_ws_cases():
    # the opt-in warp-specialized Gluon forward (kernels/attention_fwd_ws.py), its tiles (ws_tiles), 16-bit dtypes
    from triton.experimental.gluon import language as gl

    from rlhf_engine.kernels.attention_fwd_ws import ws_tiles

    # pipe: the pipelined consumers (True), the simple ones (False) or the pipelined ones with ping-pong ("pp")
    for dt, d, causal, rng, pipe in [("bf16", 64, True, False, True), ("bf16", 128, True, True, True),
                                     ("fp16", 64, False, True, True), ("fp16", 128, False, False, True),
                                     ("bf16", 64, True, True, False), ("bf16", 128, True, False, False),
                                     ("bf16", 64, True, False, "pp"), ("bf16", 128, True, True, "pp")]:
        bm, bn, stages = ws_tiles(d)
        gdt = gl.bfloat16 if dt == "bf16" else gl.float16

        def desc(rows):
            return f"tensordesc<{dt}[{rows},{d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gdt)!r}>"

        yield case(f"attn_fwd_ws-{dt}-d{d}-{'causal' if causal else 'full'}{'-range' if rng else ''}"
                    f"{'-pingpong' if pipe == 'pp' else '' if pipe else '-simple'}", "attention_fwd_ws",
                    "_attn_fwd_ws_kernel", {"O": dt, "LSE": "fp32", "KV_START": "i32", "KV_END": "i32"}, ["qk_scale"],
                    dict(HEAD_DIM=d, IS_CAUSAL=causal, HAS_KV_RANGE=rng, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
                         PIPELINE=bool(pipe), PINGPONG=pipe == "pp"), 4,
                    descs={"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn)})


def _attention_bwd_ws_cases():
    # the warp-specialized Gluon backward (kernels/attention_bwd_ws.py): dK/dV and dQ, both head dims
    from triton.experimental.gluon import language as gl

    from rlhf_engine.kernels.attention_bwd_ws import BWD_BLOCK, dq_block_n

    for dt, d, causal, rng in [("bf16", 64, True, False), ("bf16", 128, True, True), ("fp16", 64, False, True)]:
        gdt = gl.bfloat16 if dt == "bf16" else gl.float16

        def desc(rows):
            return f"tensordesc<{dt}[{rows},{d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gdt)!r}>"

        for pp in (False, True) if dt == "bf16" else (False,):  # pp: the ping-pong turns between the consumers
            tag = f"{dt}-d{d}-{'causal' if causal else 'full'}{'-range' if rng else ''}{'-pingpong' if pp else ''}"
            cx = dict(HEAD_DIM=d, IS_CAUSAL=causal, HAS_KV_RANGE=rng, BLOCK=BWD_BLOCK, STAGES=2, PINGPONG=pp)
            for atomic in (False, True):  # atomic: the 5-product form, dQ added into an fp32 buffer
                yield case(f"attn_bwd_ws_dkdv{'_atomic_dq' if atomic else ''}-{tag}", "attention_bwd_ws",
                           "_dkdv_ws_kernel", {"LSE": "fp32", "DELTA": "fp32", "DK": dt, "DV": dt, "KV_START": "i32",
                                               "KV_END": "i32", "DQ": "fp32" if atomic else dt},
                           ["qk_scale", "sm_scale"], dict(cx, ATOMIC_DQ=atomic), 4,
                           descs={n: desc(BWD_BLOCK) for n in ("q_desc", "do_desc", "k_desc", "v_desc")})
            bn = dq_block_n(d)
            yield case(f"attn_bwd_ws_dq-{tag}", "attention_bwd_ws", "_dq_ws_kernel",
                       {"LSE": "fp32", "DELTA": "fp32", "DQ": dt, "KV_START": "i32", "KV_END": "i32"},
                       ["qk_scale", "sm_scale"], dict(cx, BLOCK_N=bn), 4,
                       descs={"q_desc": desc(BWD_BLOCK), "do_desc": desc(BWD_BLOCK), "k_desc": desc(bn),
                              "v_desc": desc(bn)})


def _decode_gemm_gluon_cases():
    # the opt-in Gluon decode GEMM (kernels/decode_gemm_ws.py): Qwen2-0.5B's four projections at batch 64 with the
    # tiles its host code picks on 132 SMs (split-K on o and down), plain and with the split-K layer's fusions (the
    # norm from partial sums on q/k/v and gate/up, the residual add and the sums of squares on o and down), and a
    # 16-row fp16 one
    from triton.experimental.gluon import language as gl

    from rlhf_engine.kernels.decode_gemm_ws import BLOCK_K, BLOCK_N, tiles

    for name, dt, M, N, K, bias, swiglu, fused in [("qkv", "bf16", 64, 1152, 896, True, False, False),
                                                   ("o", "bf16", 64, 896, 896, False, False, False),
                                                   ("gate_up", "bf16", 64, 4864, 896, False, True, False),
                                                   ("down", "bf16", 64, 896, 4864, False, False, False),
                                                   ("gate_up-m16", "fp16", 16, 1536, 576, False, True, False),
                                                   ("qkv-norm", "bf16", 64, 1152, 896, True, False, True),
                                                   ("o-res", "bf16", 64, 896, 896, False, False, True),
                                                   ("gate_up-norm", "bf16", 64, 4864, 896, False, True, True),
                                                   ("down-res", "bf16", 64, 896, 4864, False, False, True),
                                                   ("qkv-norm-pdl", "bf16", 64, 1152, 896, True, False, True),
                                                   ("gate_up-norm-pdl", "bf16", 64, 4864, 896, False, True, True),
                                                   ("down-res-pdl", "bf16", 64, 896, 4864, False, False, True)]:
        block_t, splits, stages = tiles(M, N, K, swiglu, 132)
        gdt = gl.bfloat16 if dt == "bf16" else gl.float16
        norm = fused and name.startswith(("qkv", "gate_up"))  # (and "-pdl": a programmatic dependent launch)
        res = fused and not norm

        def desc(rows):
            return f"tensordesc<{dt}[{rows},{BLOCK_K}],{gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gdt)!r}>"

        yield case(f"decode_gemm_gluon-{name}-{dt}-t{block_t}-s{splits}", "decode_gemm_ws", "_decode_gemm_kernel",
                    dict(_GEMM_PTRS, Y=dt, BIAS=dt, G=dt, RO=dt), ["eps", "inv_t"],
                    dict(HAS_BIAS=bias, SWIGLU=swiglu, NORM=norm, SQ_P2=16, HAS_ORES=res, HAS_SQO=res,
                         SPLITS=splits, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_T=block_t, STAGES=stages,
                         PDL=name.endswith("-pdl")), 4,
                    descs={"w_desc": desc(BLOCK_N), "x_desc": desc(block_t)})
    # the LM head with the sampler in its epilogue (kernels/lm_head_sample.py): Qwen2-0.5B's vocabulary at batch 64,
    # sampling and greedy, the model's PDL launch, and the 16- and 32-token tiles of small (or compacted) batches
    for tag, greedy, pdl, block_t in [("sample", False, False, 64), ("greedy", True, False, 64),
                                      ("sample-pdl", False, True, 64), ("sample-t16", False, False, 16),
                                      ("greedy-pdl-t32", True, True, 32)]:
        gdt = gl.bfloat16

        def desc(rows):
            return f"tensordesc<bf16[{rows},{BLOCK_K}],{gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gdt)!r}>"

        yield case(f"decode_gemm_gluon-lm_head-{tag}", "decode_gemm_ws", "_decode_gemm_kernel",
                    dict(_GEMM_PTRS, Y="bf16", BIAS="bf16", G="bf16", RO="bf16"), ["eps", "inv_t"],
                    dict(HAS_BIAS=False, SWIGLU=False, NORM=False, SQ_P2=16, HAS_ORES=False, HAS_SQO=False, SPLITS=1,
                         BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_T=block_t, STAGES=6, PDL=pdl, SAMPLE=True,
                         GREEDY=greedy), 4,
                    descs={"w_desc": desc(BLOCK_N), "x_desc": desc(block_t)})


_GEMM_PTRS = {"SQ": "fp32", "SQO": "fp32", "WS": "fp32", "CNT": "i32", "SEED": "i64", "PART": "fp32", "PIDX": "i32"}


def gluon_cases():
    """Every Gluon kernel's cases."""
    return [*_attention_ws_cases(), *_attention_bwd_ws_cases(), *_decode_gemm_gluon_cases()]
