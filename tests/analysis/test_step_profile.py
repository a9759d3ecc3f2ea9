"""`epkit profile`: a REAL torch-profiler CPU trace (record_function step annotations around real torch work, written
by export_chrome_trace and by tensorboard_trace_handler gzipped), a hand-written chrome trace standing in for the GPU
events this CPU cannot produce (kernels, runtime launches, correlations, a graph launch, overlapping streams), and
the command on both, bad inputs included. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from epkit.analysis import step_profile as P

ROOT = Path(__file__).resolve().parents[2]
STEP_NAMES = ["execute_context_1(12)_generation_3(3)", "execute_context_0(0)_generation_4(4)",
              "execute_context_2(40)_generation_0(0)",
              "execute_40_context_2(sq40sk40sqsq800sqsk800)_generation_0(sq0sk0sqsq0sqsk0)",
              "execute_context_0(0)_generation_4(4)"]


def _work(torch):
    from torch.profiler import record_function

    a = torch.randn(96, 96)
    for name in STEP_NAMES:
        with record_function(name):
            torch.nn.functional.silu(a @ a).sum()
    with record_function("not_a_step"):
        (a @ a).sum()


@pytest.fixture(scope="module")
def cpu_traces(tmp_path_factory) -> dict[str, Path]:
    """Two real CPU traces of the same steps: plain JSON (export_chrome_trace) and gzipped (vLLM's handler)."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    root = tmp_path_factory.mktemp("traces")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _work(torch)
    prof.export_chrome_trace(str(root / "before.json"))
    gz_dir = root / "gz"
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(str(gz_dir),
                                                                                             use_gzip=True)):
        _work(torch)
    (gz,) = gz_dir.glob("*.pt.trace.json.gz")
    return {"json": root / "before.json", "gz": gz, "gz_dir": gz_dir}


def test_real_cpu_trace(cpu_traces):
    for path in (cpu_traces["json"], cpu_traces["gz"]):
        s = P.summarize(path)
        assert s["gpu"] is False and s["steps"] == 5 and s["trace"] == path.name
        kinds = s["kinds"]
        assert {k: v["steps"] for k, v in kinds.items()} == {"prefill": 2, "mixed": 1, "decode": 2}
        assert kinds["prefill"]["ctx_tokens_per_step"] == 40 and kinds["prefill"]["ctx_requests_per_step"] == 2
        assert kinds["mixed"]["ctx_tokens_per_step"] == 12 and kinds["mixed"]["gen_tokens_per_step"] == 3
        assert kinds["decode"]["gen_tokens_per_step"] == 4 and kinds["decode"]["ctx_tokens_per_step"] == 0
        for kind in kinds.values():
            assert kind["wall_ms_per_step"] > 0 and "gpu_busy_ms_per_step" not in kind
            ops = {o["name"]: o for o in kind["top_cpu_ops"]}
            assert {"aten::mm", "aten::silu", "aten::sum"} <= set(ops)
            assert ops["aten::mm"]["calls_per_step"] == 1
            # self time: aten::matmul only wraps aten::mm, so its self time is below mm's
            assert ops["aten::mm"]["self_ms_per_step"] > ops["aten::matmul"]["self_ms_per_step"] >= 0
            # host view: no runtime calls on a CPU trace; wall = inside top-level ops + python/other
            assert kind["cpu_op_ms_per_step"] > 0 and kind["python_other_ms_per_step"] >= 0
            assert kind["cpu_op_ms_per_step"] + kind["python_other_ms_per_step"] == pytest.approx(
                kind["wall_ms_per_step"])
            assert "runtime_calls" not in kind and "host_sync_ms_per_step" not in kind
    text = P.to_text([P.summarize(cpu_traces["json"])])
    assert "top cpu ops by self time, prefill steps" in text and "aten::mm" in text
    assert "python/other host ms/step" in text and "CUDA runtime/driver calls" not in text


# ---- a hand-written chrome trace: the GPU side -------------------------------------------------------------
CPU, GPU = 100, 0  # pids: the worker process; device 0


def _x(cat, name, ts, dur, pid=CPU, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def _kernel(name, ts, dur, corr, stream=7, cat="kernel"):
    return _x(cat, name, ts, dur, pid=GPU, tid=stream, corr=corr)


def gpu_trace_doc(with_steps: bool = True) -> dict:
    """Three steps on one thread (µs): prefill [0, 100], decode [200, 250] (a CUDA graph), mixed [300, 400]. Host
    side: in the prefill step aten::linear [5, 35] holds aten::mm [8, 25] (which holds two launches) and a pinned
    HtoD copy; aten::item [60, 80] holds _local_scalar_dense [61, 79] which holds a cudaStreamSynchronize [65, 77];
    a launch at [90, 92] lies in no op. The mixed step copies DtoH into pageable memory [340, 350] (a blocking
    copy) and its first launch holds a driver call of its own (not counted twice)."""
    steps = [_x("user_annotation", "execute_context_2(1000)_generation_0(0)", 0, 100),
             _x("user_annotation", "execute_context_0(0)_generation_4(4)", 200, 50),
             _x("user_annotation", "execute_1004_context_1(sq1000sk1000sqsq1000000sqsk1000000)_generation_4(sq4sk400"
                "sqsq4sqsk400)", 300, 100),
             # the GPU-side copy of a step annotation is not a step
             _x("gpu_user_annotation", "execute_context_2(1000)_generation_0(0)", 15, 50, pid=GPU, tid=7)]
    launches = [_x("cuda_runtime", "cudaLaunchKernel", 10, 2, corr=1), _x("cuda_runtime", "cudaLaunchKernel", 20, 2,
                                                                          corr=2),
                _x("cuda_runtime", "cudaMemcpyAsync", 30, 2, corr=3), _x("cuda_runtime", "cudaLaunchKernel", 90, 2,
                                                                        corr=4),
                _x("cuda_runtime", "cudaGraphLaunch", 210, 5, corr=10),
                _x("cuda_runtime", "cudaLaunchKernel", 310, 2, corr=20), _x("cuda_driver", "cuLaunchKernel", 320, 2,
                                                                            corr=21),
                _x("cuda_runtime", "cudaLaunchKernel", 150, 2, corr=30),  # between steps
                _x("cuda_runtime", "cudaLaunchKernel", 50, 2, tid=2, corr=40),  # another thread, inside S1's time
                _x("cuda_runtime", "cudaStreamSynchronize", 65, 12), _x("cuda_driver", "cuLaunchKernel", 310.5, 1),
                _x("cuda_runtime", "cudaMemcpyAsync", 340, 10, corr=22)]
    ops = [_x("cpu_op", "aten::linear", 5, 30), _x("cpu_op", "aten::mm", 8, 17), _x("cpu_op", "aten::item", 60, 20),
           _x("cpu_op", "aten::_local_scalar_dense", 61, 18),
           _x("cpu_op", "aten::copy_", 40, 20, tid=2)]  # another thread: no step's
    kernels = [
        # prefill: attention [15, 45] and a GEMM [40, 60] on two streams overlap by 5; a copy [60, 65]; a MoE GEMM
        # launched at 90 that runs [205, 245], after the step's CPU range ended and inside the decode step's
        _kernel("_prefill_attention_kernel", 15, 30, 1), _kernel("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm"
                                                                 ">(Params)", 40, 20, 2, stream=8),
        _kernel("Memcpy HtoD (Pinned -> Device)", 60, 5, 3, cat="gpu_memcpy"), _kernel("_moe_gemm_kernel", 205, 40, 4,
                                                                                      stream=8),
        # decode: one graph replay, every kernel correlated with the cudaGraphLaunch
        _kernel("_rms_norm_kernel", 215, 5, 10), _kernel("_paged_decode_kernel", 220, 20, 10),
        _kernel("_route_kernel", 240, 5, 10),
        _kernel("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(...)", 245, 5, 10),
        # mixed: an all-gather [310, 330] with a fused pointwise kernel [315, 325] inside it on another stream
        _kernel("ncclDevKernel_AllGather_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", 310, 20, 20),
        _kernel("triton_poi_fused_add_0", 315, 10, 21, stream=8),
        _kernel("Memcpy DtoH (Device -> Pageable)", 345, 2, 22, cat="gpu_memcpy"),
        _kernel("some_kernel", 150, 5, 30), _kernel("another_kernel", 55, 3, 40)]
    meta = [{"ph": "M", "name": "process_name", "pid": CPU, "tid": 0, "args": {"name": "python"}},
            {"ph": "s", "id": 1, "pid": CPU, "tid": 1, "ts": 10, "cat": "ac2g", "name": "ac2g"}]
    return {"schemaVersion": 1, "traceEvents": meta + (steps if with_steps else steps[3:]) + launches + ops + kernels}


@pytest.fixture
def gpu_trace(tmp_path) -> Path:
    path = tmp_path / "after.json"
    path.write_text(json.dumps(gpu_trace_doc()))
    return path


def test_gpu_trace_exact(gpu_trace):
    s = P.summarize(gpu_trace, top=3)
    assert s["gpu"] is True and s["steps"] == 3 and list(s["kinds"]) == ["prefill", "mixed", "decode"]
    pre, mixed, dec = s["kinds"]["prefill"], s["kinds"]["mixed"], s["kinds"]["decode"]
    approx = pytest.approx
    # prefill: the late MoE GEMM is its own (launched at 90 inside [0, 100]); busy is the union [15, 65] + [205, 245]
    assert pre["category_ms_per_step"] == approx({**dict.fromkeys(P.CATEGORIES, 0.0), "attention": 0.030,
                                                  "dense_gemm": 0.020, "memcpy": 0.005, "moe_gemm": 0.040})
    assert pre["gpu_busy_ms_per_step"] == approx(0.090) and pre["wall_ms_per_step"] == approx(0.100)
    assert pre["host_ms_per_step"] == approx(0.010)
    assert pre["gpu_idle_in_step_ms_per_step"] == approx(0.050)  # inside [0, 100] the GPU ran [15, 65] only
    assert pre["gpu_ms_per_1k_ctx_tokens"] == approx(0.090) and pre["graph_step_share"] == 0
    assert [k["name"] for k in pre["top_kernels"]] == ["_moe_gemm_kernel", "_prefill_attention_kernel",
                                                       "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>(Params)"]
    # decode: the graph replay only, not the MoE GEMM that ran inside its CPU range
    assert dec["category_ms_per_step"] == approx({**dict.fromkeys(P.CATEGORIES, 0.0), "norm_act": 0.005,
                                                  "attention": 0.020, "moe_routing": 0.005, "sampling": 0.005})
    assert dec["gpu_busy_ms_per_step"] == approx(0.035) and dec["graph_step_share"] == 1
    assert dec["gpu_ms_per_1k_ctx_tokens"] is None and dec["gen_tokens_per_step"] == 4
    # mixed (vLLM's detailed annotation): overlapping streams count once
    assert mixed["ctx_tokens_per_step"] == 1000 and mixed["gen_tokens_per_step"] == 4
    assert mixed["category_ms_per_step"]["communication"] == approx(0.020)
    assert mixed["category_ms_per_step"]["norm_act"] == approx(0.010)
    assert mixed["category_ms_per_step"]["memcpy"] == approx(0.002)
    assert mixed["gpu_busy_ms_per_step"] == approx(0.022) and mixed["gpu_ms_per_1k_ctx_tokens"] == approx(0.022)
    # where the GPU idled inside each range: before its first event, in the gaps, after its last (clipped to the range)
    split = ("gpu_idle_before_ms_per_step", "gpu_idle_between_ms_per_step", "gpu_idle_after_ms_per_step")
    assert [pre[k] for k in split] == approx([0.015, 0.0, 0.035]) and pre["gpu_events_per_step"] == 4
    assert [dec[k] for k in split] == approx([0.015, 0.0, 0.0]) and dec["gpu_events_per_step"] == 4
    assert [mixed[k] for k in split] == approx([0.010, 0.015, 0.053]) and mixed["gpu_events_per_step"] == 3
    # launched between steps and from another thread: no step's
    assert s["unattributed_gpu_events"] == 2 and s["unattributed_gpu_ms"] == approx(0.008)


def _r(*values) -> tuple:
    return tuple(round(v, 9) for v in values)


def test_gpu_trace_host_view(gpu_trace):
    """Exact host numbers of the hand-written trace (see gpu_trace_doc's docstring for the events)."""
    kinds = P.summarize(gpu_trace, top=10)["kinds"]
    pre, mixed, dec = kinds["prefill"], kinds["mixed"], kinds["decode"]
    approx = pytest.approx
    assert {o["name"]: _r(o["self_ms_per_step"], o["calls_per_step"]) for o in pre["top_cpu_ops"]} == {
        "aten::_local_scalar_dense": (0.018, 1), "aten::mm": (0.017, 1), "aten::linear": (0.013, 1),
        "aten::item": (0.002, 1)}
    assert [o["name"] for o in pre["top_cpu_ops"]][:2] == ["aten::_local_scalar_dense", "aten::mm"]
    assert {r["name"]: _r(r["ms_per_step"], r["calls_per_step"], r["sync_ms_per_step"]) for r in pre["runtime_calls"]} \
        == {"cudaStreamSynchronize": (0.012, 1, 0.012), "cudaLaunchKernel": (0.006, 3, 0),
            "cudaMemcpyAsync": (0.002, 1, 0)}  # the pinned HtoD copy does not block
    # wall 100 µs = top-level ops [5, 35] + [60, 80] (50) + the launch outside ops (2) + python/other (48)
    assert (pre["cpu_op_ms_per_step"], pre["runtime_outside_ops_ms_per_step"], pre["python_other_ms_per_step"]) \
        == approx((0.050, 0.002, 0.048))
    assert (pre["host_sync_ms_per_step"], pre["launches_per_step"], pre["graph_launches_per_step"]) == \
        approx((0.012, 3, 0))
    # decode: one graph launch [210, 215], no op
    assert (dec["launches_per_step"], dec["graph_launches_per_step"], dec["host_sync_ms_per_step"]) == (0, 1, 0)
    assert (dec["runtime_outside_ops_ms_per_step"], dec["python_other_ms_per_step"]) == approx((0.005, 0.045))
    assert dec["top_cpu_ops"] == []
    # mixed: the pageable DtoH copy blocks; the driver call inside the first cudaLaunchKernel is not counted again
    assert {r["name"]: _r(r["ms_per_step"], r["calls_per_step"], r["sync_ms_per_step"])
            for r in mixed["runtime_calls"]} == {"cudaMemcpyAsync": (0.010, 1, 0.010),
                                                 "cudaLaunchKernel": (0.002, 1, 0), "cuLaunchKernel": (0.002, 1, 0)}
    assert (mixed["host_sync_ms_per_step"], mixed["launches_per_step"]) == approx((0.010, 2))
    assert (mixed["cpu_op_ms_per_step"], mixed["runtime_outside_ops_ms_per_step"],
            mixed["python_other_ms_per_step"]) == approx((0, 0.014, 0.086))
    text = P.to_text([P.summarize(gpu_trace)])
    for title in ("after.json: top cpu ops by self time, prefill steps", "after.json: CUDA runtime/driver calls, "
                  "mixed steps"):
        assert title in text


@pytest.mark.parametrize("name, copy, blocks", [
    ("cudaStreamSynchronize", None, True), ("cudaDeviceSynchronize", None, True), ("cudaEventSynchronize", None, True),
    ("cuStreamSynchronize", None, True), ("cuCtxSynchronize", None, True), ("cudaMemcpy", None, True),
    ("cuMemcpyDtoH_v2", None, True), ("cudaMemcpyAsync", "Memcpy DtoH (Device -> Pageable)", True),
    ("cudaMemcpyAsync", "Memcpy DtoH (Device -> Pinned)", False), ("cudaMemcpyAsync", None, False),
    ("cudaLaunchKernel", None, False), ("cudaStreamWaitEvent", None, False), ("cudaEventQuery", None, False),
])
def test_blocks_host(name, copy, blocks):
    assert P.blocks_host(name, copy) is blocks


@pytest.mark.parametrize("name, category", [
    ("_paged_decode_kernel", "attention"), ("_write_kv_kernel", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>(...)", "attention"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)", "attention"),
    ("fused_moe_kernel", "moe_gemm"), ("void cutlass::device_kernel<GemmUniversal<GroupProblemShape<>>>", "moe_gemm"),
    ("_count_pairs_kernel", "moe_routing"), ("_place_pairs_kernel", "moe_routing"),
    ("_gather_rows_kernel", "moe_routing"), ("_combine_rows_kernel", "moe_routing"),
    ("void vllm::moe::topkGatingSoftmax<8, 128>(...)", "moe_routing"),
    ("void vllm::moe::moe_align_block_size_kernel<int>(...)", "moe_routing"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "dense_gemm"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "dense_gemm"),
    ("_norm_rope_kernel", "norm_act"), ("_silu_mul_kernel", "norm_act"),
    ("void vllm::act_and_mul_kernel<silu_kernel>(...)", "norm_act"), ("triton_red_fused_mean_pow_1", "norm_act"),
    ("void vllm::cross_device_reduce_1stage<bf16, 2>(...)", "communication"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(...)", "sampling"),
    ("void at::native::distribution_elementwise_grid_stride_kernel<exponential>", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "other"),
])
def test_kernel_categories(name, category):
    assert P.kernel_category(name) == category


# ---- the command -------------------------------------------------------------------------------------------
def epkit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epkit.cli", "profile", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_side_by_side(cpu_traces, gpu_trace, tmp_path):
    md, js = tmp_path / "out.md", tmp_path / "out.json"
    run = epkit(cpu_traces["json"], cpu_traces["gz_dir"], gpu_trace, "--markdown", md, "--json", js, "--top", 3)
    assert run.returncode == 0, run.stderr
    assert "prefill steps, side by side" in run.stdout and "after.json: top kernels, prefill steps" in run.stdout
    text = md.read_text()
    header = f"|  | before.json | {cpu_traces['gz'].name} | after.json |"
    assert text.count(header) == 3  # prefill, mixed, decode
    prefill = text.split("**prefill steps, side by side**")[1].split("**")[0]
    assert "| GPU busy ms/step | - | - | 0.090 |" in prefill and "| attention GPU ms/step | - | - | 0.030 |" in prefill
    assert "| steps | 2 | 2 | 1 |" in prefill
    assert "| host sync ms/step | - | - | 0.012 |" in prefill and "| launches/step | - | - | 3 |" in prefill
    assert "| aten::_local_scalar_dense self ms/step | - | - | 0.018 |" in prefill
    assert "| python/other host ms/step |" in prefill
    doc = json.loads(js.read_text())
    assert [t["trace"] for t in doc["traces"]] == ["before.json", cpu_traces["gz"].name, "after.json"]
    assert doc["traces"][2]["kinds"]["decode"]["graph_step_share"] == 1


def test_cli_bad_inputs(gpu_trace, tmp_path):
    missing = tmp_path / "missing.json"
    run = epkit(missing)
    assert run.returncode == 2 and str(missing) in run.stderr and "no such file" in run.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("this is not json")
    not_trace = tmp_path / "other.json"
    not_trace.write_text(json.dumps({"a": 1}))
    for path in (junk, not_trace):
        run = epkit(path)
        assert run.returncode == 2 and str(path) in run.stderr and "not a chrome trace" in run.stderr
        assert "traceEvents" in run.stderr
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(gpu_trace_doc(with_steps=False)))
    run = epkit(gpu_trace, bare)
    assert run.returncode == 2 and str(bare) in run.stderr and "no engine step annotations" in run.stderr
    assert "execute_context_{n}({tokens})_generation_{m}({tokens})" in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = epkit(empty)
    assert run.returncode == 2 and str(empty) in run.stderr and "holds no trace" in run.stderr


def test_cli_folder_skips_traces_without_steps(gpu_trace, tmp_path):
    """vLLM's frontend profile lies beside the workers' traces: in a folder it is left out with a note."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "worker.pt.trace.json").write_text(gpu_trace.read_text())
    (folder / "frontend.pt.trace.json").write_text(json.dumps(gpu_trace_doc(with_steps=False)))
    (folder / "notes.txt").write_text("not a trace, not read")
    run = epkit(folder)
    assert run.returncode == 0, run.stderr
    assert "skipped" in run.stderr and "frontend.pt.trace.json" in run.stderr
    assert "worker.pt.trace.json: steps by kind" in run.stdout and "frontend.pt.trace.json:" not in run.stdout
    (folder / "worker.pt.trace.json").unlink()
    run = epkit(folder)
    assert run.returncode == 2 and "no engine step annotations" in run.stderr


def test_step_lookup_back_to_back_and_nested():
    """Steps that end where the next begins, and (never seen, but legal) a step nested in another: the innermost
    range that holds the launch wins."""
    steps = [P.Step("a", {}, 0, 10), P.Step("b", {}, 10, 20), P.Step("outer", {}, 30, 60), P.Step("inner", {}, 35, 40)]
    index = P._ThreadSteps(steps)
    assert [index.at(t).name if index.at(t) else None for t in (5, 10, 15, 25, 32, 37, 50, 61)] == \
        ["a", "b", "b", None, "outer", "inner", "outer", None]


def test_side_by_side_cpu_traces(cpu_traces):
    """Two CPU traces: the side-by-side tables carry no GPU rows but the top cpu ops' self ms/step."""
    text = P.to_markdown([P.summarize(cpu_traces["json"]), P.summarize(cpu_traces["gz"])])
    decode = text.split("**decode steps, side by side**")[1].split("**")[0]
    assert "| steps | 2 | 2 |" in decode and "| aten::mm self ms/step |" in decode and "GPU" not in decode
