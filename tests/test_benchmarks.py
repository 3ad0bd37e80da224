"""The benchmark scripts: every one runs end to end on tiny shapes (``run_all.py --smoke``), and the
runner's target verdicts are right.

GPU time is scarce (one short session, when one is lent at all): a benchmark that crashes on a typo,
a wrong keyword or a CPU/GPU mix-up would cost that session its numbers. The smoke run executes each
script's whole path here, its correctness check against the baseline included, on the CPU under the
Triton interpreter. Only the CUDA-graph and FlexAttention branches are left for the GPU.
"""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RLHF_BENCH_SMOKE")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out", str(out),
                           "--summary", str(out / "summary.md"), "--timeout", "240"],
                          env=env, capture_output=True, text=True, timeout=1200)
    return proc, out


def test_every_benchmark_runs_in_smoke_mode(smoke_run):
    proc, out = smoke_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    summary = (out / "summary.md").read_text()
    for name in scripts:
        line = next((s for s in summary.splitlines() if s.startswith(f"- {name}: ")), None)
        assert line is not None, f"{name} missing from the summary:\n{summary}"
        assert line.startswith(f"- {name}: ok ("), f"{name} did not run cleanly: {line}\n{log[-5000:]}"
    assert "MISMATCH" not in log, "a benchmark's correctness check failed:\n" + log[-5000:]
    assert "Traceback" not in log, log[-5000:]


def test_smoke_rows_reach_the_csv(smoke_run):
    _, out = smoke_run
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    ops = {r["op"] for r in rows}
    for op in ("logprob fwd", "lm_head+logprob fwd+bwd", "attention_fwd+bwd", "decode_attention", "generate",
               "ppo step"):
        assert op in ops, f"no {op!r} rows in results.csv (ops: {sorted(ops)})"
    for r in rows:
        ms = float(r["ms"])
        assert ms == ms and ms > 0, f"bad ms in {r}"
        # the environment columns every row carries (common.record): when, what code, on what
        assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d", r["date"]), f"bad date in {r}"
        assert r["commit"] and r["device"] == "cpu" and r["torch"] == torch.__version__ and r["triton"], r
        assert r["impl"] and r["shape"], r


def test_smoke_does_not_touch_the_committed_csv(tmp_path, monkeypatch):
    """Without an explicit $OUT a smoke run records nothing (benchmarks/results.csv holds GPU numbers only)."""
    import common

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setenv("RLHF_BENCH_SMOKE", "1")
    before = common.results_path().read_bytes() if common.results_path().exists() else None
    common.record([{"op": "x", "impl": "ours", "ms": 1.0}])
    after = common.results_path().read_bytes() if common.results_path().exists() else None
    assert before == after


def _row(op, impl, ms, **kw):
    return {"op": op, "shape": "s", "impl": impl, "ms": ms, **kw}


def test_floors_use_the_card_that_runs():
    """The floors' ceilings come from the card's name: an H200's copy bandwidth (4.3 TB/s measured) and not the
    H100's 3.0, which would put a faster card's memory-bound kernels under their floor."""
    import common

    assert common.card_ceilings("NVIDIA H200") == ("H200", 788.0, 4.3)
    assert common.card_ceilings("NVIDIA H100 80GB HBM3") == ("H100", 764.0, 3.0)
    assert common.card_ceilings("NVIDIA A100-SXM4-80GB") == ("H100", 764.0, 3.0)  # unknown: the H100's figures
    if not torch.cuda.is_available():
        assert (common.CARD, common.BF16_TFLOPS, common.COPY_TBPS) == ("H100", 764.0, 3.0)


@pytest.mark.parametrize("ours_ms, met", [(0.08, "yes"), (0.2, "NO")])
def test_target_ppo_loss(ours_ms, met):
    group = [_row("ppo_loss fwd+bwd", "eager PyTorch", 1.87, vs_baseline=1.0),
             _row("ppo_loss fwd+bwd", "ours triton", ours_ms, vs_baseline=1.87 / ours_ms)]
    assert run_all.target(group[1], group) == (">=20x eager", met)


def test_target_attention_needs_both_baselines():
    group = [_row("attention_fwd", "sdpa_default", 1.0), _row("attention_fwd", "sdpa_flash_fa2", 1.5),
             _row("attention_fwd", "ours", 1.1)]
    assert run_all.target(group[2], group)[1] == "yes"          # 1.36x FA2, 0.91x SDPA
    group[2]["ms"] = 1.2                                        # 1.25x FA2: misses
    assert run_all.target(group[2], group)[1] == "NO"
    group[2]["ms"] = 1.1
    assert run_all.target(group[2], group[1:])[1] == "?"        # no default SDPA row: cannot judge


def test_target_logprob_uses_the_floor():
    group = [_row("logprob fwd", "eager", 16.0), _row("logprob fwd", "ours (triton)", 2.0, vs_baseline=8.0,
                                                      floor_ms=1.66)]
    assert run_all.target(group[1], group)[1] == "yes"
    group[1].update(ms=2.6, vs_baseline=16.0 / 2.6)             # > 1.5x the floor
    assert run_all.target(group[1], group)[1] == "NO"


def test_summary_marks_cpu_runs_not_judged():
    res = [{"script": "bench_gae", "status": "ok", "seconds": 1.0,
            "rows": [_row("gae", "python loop", 80.0, vs_baseline=1.0), _row("gae", "ours", 0.05, vs_baseline=1600.0)]}]
    lines, status = run_all.summarize(res, on_gpu=False)
    assert lines[1][-1] == "n/a (CPU)" and status == ["bench_gae: ok (2 rows, 1.0 s)"]
    lines, _ = run_all.summarize(res, on_gpu=True)
    assert lines[1][-1] == "yes"


def test_target_fused_lm_head_against_the_fastest_liger():
    group = [_row("lm_head+logprob fwd+bwd", "eager", 31.0), _row("lm_head+logprob fwd+bwd", "Liger FLCE none", 89.5),
             _row("lm_head+logprob fwd+bwd", "Liger FLCE sum", 70.1),
             _row("lm_head+logprob fwd+bwd", "ours (chunked)", 25.0, peak_mb=600.0)]
    assert run_all.target(group[3], group)[1] == "yes"
    group[3]["peak_mb"] = 2048.0                                # extra peak over 1 GB
    assert run_all.target(group[3], group)[1] == "NO"
    group[2]["ms"], group[3]["peak_mb"] = 20.0, 600.0          # a Liger variant faster than ours
    assert run_all.target(group[3], group)[1] == "NO"


def test_budget_start_minimums():
    """A long script is not started to be killed before its first row; a cheap one after it still runs."""
    assert not run_all.may_start("bench_ppo_step", 100.0) and run_all.may_start("bench_ppo_step", 120.0)
    assert not run_all.may_start("bench_attention", 60.0) and run_all.may_start("bench_gae", 25.0)
    assert not run_all.may_start("bench_gae", 10.0)


def test_child_gets_its_deadline(tmp_path, monkeypatch):
    """run_script hands each script its deadline (BENCH_DEADLINE -> common.time_left), a few seconds inside
    its timeout, so optional passes (attention's variants, Flex) can stop before the kill."""
    import common

    monkeypatch.delenv("BENCH_DEADLINE", raising=False)
    assert common.time_left() == float("inf")
    monkeypatch.setenv("OUT", str(tmp_path))  # the child's record() writes here, not to benchmarks/results.csv
    script = tmp_path / "bench_deadline_probe.py"
    script.write_text("from common import time_left\n\n\ndef main():\n"
                      "    return [{'op': 'probe', 'shape': '-', 'impl': 'ours', 'ms': time_left()}]\n")
    res = run_all.run_script(script, 60.0, tmp_path)
    assert res["status"] == "ok" and len(res["rows"]) == 1
    assert 40.0 < res["rows"][0]["ms"] <= 55.0


def test_autotune_report_lines():
    import triton
    from common import autotune_report

    class Tuned:  # what triton.autotune objects expose after tuning: cache and configs_timings
        pass

    a, b = (triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=4, num_stages=2) for m in (64, 128))
    t = Tuned()
    t.cache, t.configs_timings = {(64, "torch.bfloat16"): b}, {a: [0.5, 0.4, 0.6], b: [0.25, 0.2, 0.3]}
    lines = autotune_report({"attn_fwd": t, "untuned": Tuned()})
    assert lines == ["autotune attn_fwd key=(64, 'torch.bfloat16'): best BLOCK_M=128,BLOCK_N=32,w=4,s=2",
                     "autotune attn_fwd last run: BLOCK_M=128,BLOCK_N=32,w=4,s=2 0.25 ms; "
                     "BLOCK_M=64,BLOCK_N=32,w=4,s=2 0.5 ms"]


def test_record_value_writes_to_out(record_value, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    record_value("nothing without OUT", 1.0)
    monkeypatch.setenv("OUT", str(tmp_path))
    record_value("bf16 o: max err ours / PyTorch's", 0.8125)
    record_value("count", 3)
    lines = (tmp_path / "measured.txt").read_text().splitlines()
    assert [ln.split(" | ")[1:] for ln in lines] == [["bf16 o: max err ours / PyTorch's", "0.8125"], ["count", "3"]]
    assert lines[0].startswith("tests/test_benchmarks.py::test_record_value_writes_to_out")


def test_decode_step_kernel_count():
    """benchmarks/decode_launches.py: the generation path's packed GEMMs and fused kernels cut a decode layer from
    27 kernels to 9 (counted under the interpreter: Triton launches plus computing ATen ops; at most 10 asserted),
    the fused cache write (the default; RLHF_ENGINE_DECODE_FUSED_WRITE=0 turns it off) one more, the opt-in norms
    inside the GEMMs (RLHF_ENGINE_DECODE_NORM_GEMM=1) three more, and the Triton sampler needs fewer than the eager
    one. With LoRA adapters on all 7 projections: the q/k/v and gate/up groups
    run as one packed base GEMM, one stacked-A GEMM (and its cat) and a B term per layer, o_proj and down_proj
    as base GEMM, A GEMM and B term: 23 a layer."""
    import decode_launches

    unfused, fused, lora, fused_write, norm_gemm, both = decode_launches.main(num_layers=24)
    assert fused["per_layer"] <= 10 and fused["per_layer"] * 2 <= unfused["per_layer"]
    assert fused_write["per_layer"] == fused["per_layer"] - 1  # the cache write rides in the attention kernel
    assert fused["step"] < unfused["step"] and fused["sampling"] < unfused["sampling"]
    assert lora["per_layer"] <= fused["per_layer"] + 13, lora  # 2 x (cat + A GEMM) + 5 B terms + 2 x (A + B)
    # the opt-in norms inside the GEMMs (RLHF_ENGINE_DECODE_NORM_GEMM=1): 2 norms and silu * up fewer a layer
    assert norm_gemm["per_layer"] == fused["per_layer"] - 3 and both["per_layer"] == fused["per_layer"] - 4


def test_host_train_script_runs():
    """benchmarks/host_train.py (quoted by RESULTS.md): every case runs, in a child process (it stubs the
    interpreter's launches, which must not leak into this one)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_train.py"), "--rounds", "1", "--reps", "1",
                           "--layers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in ("no checkpointing", "checkpoint_layer (ours)", "torch.utils.checkpoint", "scoring fwd"):
        assert case in proc.stdout, proc.stdout


def test_gpu_check_fits_the_device_tools_file_cap(tmp_path):
    """The device tool returns at most 8 files from $OUT (one session lost nothing only because no GPU run wrote
    them all): gpu_check.sh writes at most 8 names there, with results.csv (benchmarks/common.py) and measured.txt
    (tests/conftest.py). And a dry run here (no GPU; every step skipped but the Gluon probes and the summary) runs
    through: both probes report "not run", and the files it leaves are among those names."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    names = set(re.findall(r'"\$OUT/([\w.]+)"', script)) | {"results.csv", "measured.txt"}
    assert len(names) <= 8, sorted(names)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), GPU_CHECK_SKIP="build fastlaunch host tests ktests bench", GPU_CHECK_BUDGET_S="200")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "warp-specialized attention not run (no sm_90 device); decode GEMM not run (no sm_90 device)" in out, \
        out[-3000:]
    left = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert left and left <= names, (left, names)


@pytest.mark.parametrize("pipelined_rc,pingpong_rc,expected", [
    (0, 1, "simple forward and backward ok; ping-pong WRONG"),
    (1, 0, "simple forward and backward ok; pipelined forward WRONG"),
    (0, 0, "probes: warp-specialized attention simple forward and backward ok; decode GEMM"),
    (0, 4, "ping-pong CRASHED (an exception"),  # ws_probe.py's exit status for a raised exception
])
def test_gpu_check_follows_the_attention_probes(pipelined_rc, pingpong_rc, expected, tmp_path):
    """gpu_check.sh's chain of ws_probe.py runs, with a stand-in python whose probes exit as told: after the simple
    probe passed, the pipelined one runs, then the ping-pong one only where the pipelined passed; a failure is
    named in the summary line (and turns that form off)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = benchmarks/ws_probe.py ]; then
  echo "probe $2" >> "{tmp_path}/probes.log"
  case "$2" in --pipelined) exit {pipelined_rc} ;; --pingpong) exit {pingpong_rc} ;; --gemm) exit 2 ;; *) exit 0 ;; esac
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=str(fake), GPU_CHECK_SKIP="build fastlaunch host tests ktests bench",
               GPU_CHECK_BUDGET_S="400")
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert expected in out, out[-3000:]
    probes = (tmp_path / "probes.log").read_text().split()
    assert ("--pingpong" in probes) == (pipelined_rc == 0), probes
    assert "--atomic" in probes and "--gemm" in probes, probes


def test_gpu_check_runs_the_gpu_tests_with_their_settings(tmp_path):
    """The GPU test step hands pytest its settings (fixed attention tiles, the threads a worker) and the files of
    GPU_CHECK_TEST_FILES: checked with a stand-in python that logs how pytest was called (a comment line once cut
    the environment off the command, and the tests ran autotuning every tile)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pytest ]; then
  echo "AUTOTUNE=${{RLHF_ENGINE_AUTOTUNE:-unset}} OMP=${{OMP_NUM_THREADS:-unset}} $*" >> "{tmp_path}/pytest.log"
  exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RLHF_ENGINE_AUTOTUNE",
                                                            "OMP_NUM_THREADS")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=str(fake), GPU_CHECK_BUDGET_S="400",
               GPU_CHECK_SKIP="build fastlaunch host wsprobe gemmprobe ktests bench",
               GPU_CHECK_TEST_FILES="tests/test_decode_gemm_ws.py tests/test_lm_head_sample.py")
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    calls = [ln for ln in (tmp_path / "pytest.log").read_text().splitlines() if "-m gpu" in ln]
    assert len(calls) == 1, (calls, proc.stdout[-2000:])
    assert calls[0].startswith("AUTOTUNE=0 OMP=") and "OMP=unset" not in calls[0], calls[0]
    assert "-m gpu tests/test_decode_gemm_ws.py tests/test_lm_head_sample.py --durations" in calls[0], calls[0]
