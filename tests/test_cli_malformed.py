"""Every `epkit` entry point meets malformed input with one clear message, exit status 2 and no traceback,
and starts nothing.

Each case is a command line (plan, sweep, report, doctor, eplb, bench, serve, and `epkit` itself) with a
bad spec, flag or file, and the pieces its message must contain: the field or flag, the value, and what
is allowed where there is a list. Cases marked ``proc`` run as real processes (``python -m epkit.cli``,
in parallel); the others call :func:`epkit.cli.main` in this process with stdout/stderr captured and
``SystemExit`` turned into the exit status, which is what the console script does with them (an
exception escaping ``main`` fails the test as it would print a traceback). Nothing may start: plan and
every other command print nothing on stdout, a sweep writes no results folder, bench never connects to
the real listener its URL points at, and serve exits at once without binding its port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from epkit import cli

ROOT = Path(__file__).resolve().parents[1]
DS = "deepseek-ai/DeepSeek-V3-0324"
EP8 = {"model": DS, "dp": 8, "enable_expert_parallel": True}
SWEEP = {"name": "bad", "model": "epkit-tiny-moe", "engine": "epkit", "defaults": {"gpus_per_node": 2},
         "topologies": {"dp": 1}, "workloads": [{"num_prompts": 2}]}
SHORT = ["--steps", "4", "--layers", "2", "--experts", "16", "--tokens", "32"]  # a tiny synthetic EPLB trace

# files the cases read, written into a fresh folder (@D in a command line)
FILES = {
    "nomodel.yaml": {"tp": 1, "dp": 2},
    "unknown_key.yaml": {**EP8, "tensor_parallel": 2},
    "dp_string.yaml": {**EP8, "dp": "eight"},
    "dp_not_divisible.yaml": {**EP8, "dp": 12, "nodes": 8, "data_parallel_address": "10.0.0.1"},
    "bad.yaml": "model: [unclosed\ndp: 2\n",
    "list.yaml": "- model: x\n",
    "empty.yaml": "",
    "binary.yaml": b"\xff\xfe\x00\x01",
    "gpus_unknown.yaml": {**EP8, "plan": {"gpus": ["B300"]}},
    "plan_key.yaml": {**EP8, "plan": {"gpu_count": 8}},
    "plan_empty.yaml": {**EP8, "plan": {"gpus": []}},
    "pplx.yaml": {**EP8, "all2all_backend": "pplx"},
    "version.yaml": {**EP8, "vllm_version": "0.0.1"},
    "multinode.yaml": {**EP8, "dp": 16, "nodes": 2},
    "redundant.yaml": {**EP8, "eplb": {"num_redundant_experts": 2}},
    "engine.yaml": {**EP8, "engine": "sglang"},
    "mml_word.yaml": {**EP8, "extra_args": ["--max-model-len", "lots"]},
    "mml_twice.yaml": {**EP8, "max_model_len": 4096, "extra_args": ["--max-model-len", "8192"]},
    "gmu.yaml": {**EP8, "gpu_memory_utilization": 1.5},
    "model_config.yaml": {"model": "acme/custom", "model_config": "@D/not_a_config.json"},
    "not_a_config.json": "[1, 2, 3]",
    "sweep_unknown.yaml": {**SWEEP, "colour": "red"},
    "sweep_gpus_both.yaml": {**SWEEP, "plan": {"gpu": "H100", "gpus": ["H200"]}},
    "sweep_rate.yaml": {**SWEEP, "workloads": [{"num_prompts": 2, "request_rate": [-1]}]},
    "sweep_defaults.yaml": {**SWEEP, "defaults": [1, 2]},
    "sweep_no_topologies.yaml": {k: v for k, v in SWEEP.items() if k != "topologies"},
    "sweep_parallel.yaml": {**SWEEP, "max_parallel": 0},
    "sweep_dp.yaml": {**SWEEP, "topologies": {"grid": {"dp": [1, 3]}}},
    "sweep_plan_gpu.yaml": {**SWEEP, "plan": {"gpus": "B300"}},
    "sweep_dataset_list.yaml": {**SWEEP, "workloads": [{"num_prompts": 2, "dataset": ["random"]}]},
    "sweep_workload_name.yaml": {**SWEEP, "workloads": [{"num_prompts": 2, "name": 7}]},
    "backend_list.yaml": {**EP8, "all2all_backend": ["pplx"]},
    "sweep_vllm_bin_list.yaml": {**SWEEP, "engine": "vllm", "vllm_bin": ["vllm", "serve"]},
    "sweep_vllm_missing.yaml": {**SWEEP, "engine": "vllm", "model": "Qwen/Qwen3-30B-A3B",
                                "vllm_bin": "/no/such/dir/vllm"},
    "trace.json": "garbage",
}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # pieces of the one message (field/flag, value, what is allowed)
    proc: bool = False  # run as a real process


def case(id_: str, argv: str | list[str], *expect: str, proc: bool = False) -> Case:
    return Case(id_, tuple(argv.split() if isinstance(argv, str) else argv), expect, proc)


CASES = [
    # ---- epkit plan: spec files ---------------------------------------------------------------
    case("plan_no_model", "plan @D/nomodel.yaml", "nomodel.yaml", "topology.model is missing", "model_config", proc=True),
    case("plan_unknown_key", "plan @D/unknown_key.yaml", "tensor_parallel", "valid keys", "tp, dp"),
    case("plan_wrong_type", "plan @D/dp_string.yaml", "dp='eight'", "integer"),
    case("plan_dp_not_divisible", "plan @D/dp_not_divisible.yaml", "dp=12", "nodes=8", "multiple of 8"),
    case("plan_bad_yaml", "plan @D/bad.yaml", "bad.yaml", "not valid YAML at line"),
    case("plan_top_level_list", "plan @D/list.yaml", "top level must be a mapping", "list"),
    case("plan_empty_file", "plan @D/empty.yaml", "top level must be a mapping", "NoneType"),
    case("plan_binary_file", "plan @D/binary.yaml", "binary.yaml", "not a text file"),
    case("plan_missing_file", "plan @D/nope.yaml", "nope.yaml", "does not exist"),
    case("plan_folder", "plan @D", "is not a file"),
    case("plan_unknown_gpu", "plan @D/gpus_unknown.yaml", "gpu='B300'", "H100, H200, H20"),
    case("plan_unknown_plan_key", "plan @D/plan_key.yaml", "gpu_count", "valid keys: gpus"),
    case("plan_no_gpus", "plan @D/plan_empty.yaml", "plan.gpus is empty"),
    case("plan_replaced_backend", "plan @D/pplx.yaml", "all2all_backend", "'pplx'", "allow_replaced_backend"),
    case("plan_unknown_vllm", "plan @D/version.yaml", "vllm_version", "'0.0.1'", "known versions"),
    case("plan_multinode_no_address", "plan @D/multinode.yaml", "data_parallel_address", "nodes=2"),
    case("plan_redundant_uneven", "plan @D/redundant.yaml", "num_redundant_experts=2", "0, 8, 16"),
    case("plan_backend_list", "plan @D/backend_list.yaml", "all2all_backend=['pplx']", "allgather_reducescatter"),
    case("plan_unknown_engine", "plan @D/engine.yaml", "engine='sglang'", "vllm, epkit"),
    case("plan_extra_args_length_word", "plan @D/mml_word.yaml", "--max-model-len 'lots'", "32k"),
    case("plan_extra_args_two_lengths", "plan @D/mml_twice.yaml", "max_model_len=4096", "--max-model-len 8192"),
    case("plan_utilization_range", "plan @D/gmu.yaml", "gpu_memory_utilization=1.5", "(0, 1]"),
    case("plan_model_config_not_config", "plan @D/model_config.yaml", "model_config=", "not_a_config.json"),
    # ---- epkit plan: flags ----------------------------------------------------------------------
    case("plan_nothing", "plan", "topology.model is missing", "--model"),
    case("plan_flag_not_int", f"plan --model {DS} --dp abc", "--data-parallel-size", "'abc'"),
    case("plan_flag_gpu", f"plan --model {DS} --gpu B300", "gpu='B300'", "NAME=GiB"),
    case("plan_flag_gpu_size", f"plan --model {DS} --gpu H100=inf", "gpu='H100=inf'", "NAME=GiB"),
    case("plan_flag_length_zero", f"plan --model {DS} --max-model-len 0", "max_model_len=0", ">= 1"),
    case("plan_flag_length_not_a_count", f"plan --model {DS} --max-model-len 3x2k", "--max-model-len", "32k"),
    case("plan_flag_utilization", f"plan --model {DS} --gpu-memory-utilization 1.5", "gpu_memory_utilization=1.5",
         "(0, 1]"),
    case("plan_flag_eplb_json", ["plan", "--model", DS, "--dp", "8", "--enable-expert-parallel", "--eplb-config",
                                 '{"window_size": 10,'], "eplb_config=", "not valid JSON"),
    case("plan_flag_eplb_not_object", ["plan", "--model", DS, "--dp", "8", "--enable-expert-parallel",
                                       "--eplb-config", "[1]"], "eplb_config='[1]'", "JSON object"),
    case("plan_flag_eplb_key", ["plan", "--model", DS, "--dp", "8", "--enable-expert-parallel", "--eplb-config",
                                '{"window": 5}'], "window", "valid keys: window_size"),
    case("plan_flag_dotted_no_value", f"plan --model {DS} --dp 8 --enable-expert-parallel "
                                      "--eplb-config.num_redundant_experts", "--eplb-config.num_redundant_experts",
         "has no value"),
    case("plan_flag_dotted_key", f"plan --model {DS} --dp 8 --enable-expert-parallel --eplb-config.windw 5",
         "windw", "valid keys: window_size"),
    case("plan_flag_dotted_twice", ["plan", "--model", DS, "--dp", "8", "--enable-expert-parallel", "--eplb-config",
                                    '{"num_redundant_experts": 8}', "--eplb-config.num_redundant_experts", "16"],
         "num_redundant_experts", "give it once"),
    case("plan_flag_format", f"plan --model {DS} --format xml", "--format", "'xml'", "text", "json"),
    case("plan_flag_unknown", f"plan --model {DS} --tensor-paralel-size 2", "unrecognized arguments",
         "--tensor-paralel-size"),
    case("plan_check_missing_python", f"plan --model {DS} --check-with-vllm @D/no-python",
         "--check-with-vllm", "no-python", "does not exist"),
    case("plan_check_python_without_vllm", ["plan", "--model", DS, "--check-with-vllm", sys.executable],
         "--check-with-vllm", sys.executable, "has no vLLM", proc=True),
    # ---- epkit sweep (real processes: a valid spec would start deployments) ----------------------
    case("sweep_missing", "sweep @D/nope.yaml --results @D/results", "nope.yaml", "does not exist", proc=True),
    case("sweep_bad_yaml", "sweep @D/bad.yaml --results @D/results", "not valid YAML", proc=True),
    case("sweep_unknown_key", "sweep @D/sweep_unknown.yaml --results @D/results", "colour", "valid keys", proc=True),
    case("sweep_gpu_and_gpus", "sweep @D/sweep_gpus_both.yaml --results @D/results", "both gpu and gpus", proc=True),
    case("sweep_bad_rate", "sweep @D/sweep_rate.yaml --results @D/results", "request_rate=-1", "> 0", proc=True),
    case("sweep_defaults_list", "sweep @D/sweep_defaults.yaml --results @D/results", "defaults=[1, 2]", "mapping",
         proc=True),
    case("sweep_no_topologies", "sweep @D/sweep_no_topologies.yaml --results @D/results", "`topologies` is missing",
         proc=True),
    case("sweep_max_parallel", "sweep @D/sweep_parallel.yaml --results @D/results", "max_parallel=0", ">= 1",
         proc=True),
    case("sweep_dp_too_big", "sweep @D/sweep_dp.yaml --results @D/results", "dp_local=3", "gpus_per_node=2",
         proc=True),
    case("sweep_unknown_gpu", "sweep @D/sweep_plan_gpu.yaml --results @D/results", "gpu='B300'", "H100", proc=True),
    case("sweep_dataset_list", "sweep @D/sweep_dataset_list.yaml --results @D/results", "dataset=['random']",
         "sharegpt", proc=True),
    case("sweep_workload_name", "sweep @D/sweep_workload_name.yaml --results @D/results", "name=7", "string",
         proc=True),
    # ---- epkit report ------------------------------------------------------------------------------
    case("report_missing", "report @D/no-results -o @D/r.html", "no-results", "does not exist"),
    case("report_no_results", "report @D/empty-folder -o @D/r.html", "no result files"),
    case("report_output_is_folder", "report results/sample -o @D", "-o", "is a folder"),
    case("report_unknown_column", "report results/sample --x no_such_column -o @D/r.html", "--x 'no_such_column'",
         "no such column"),
    # ---- epkit doctor --------------------------------------------------------------------------------
    case("doctor_port_range", "doctor --ports 70000", "--ports", "70000", "1-65535"),
    case("doctor_port_word", "doctor --ports http", "--ports", "'http'", "1-65535"),
    case("doctor_unknown_backend", "doctor --vllm-version 0.32.0 --all2all-backend magic", "--all2all-backend",
         "'magic'", "allgather_reducescatter"),
    case("doctor_unknown_version", "doctor --vllm-version 0.0.1", "vllm_version", "'0.0.1'", "known versions"),
    # ---- epkit eplb ----------------------------------------------------------------------------------
    case("eplb_no_command", "eplb", "required", "COMMAND"),
    case("eplb_unknown_command", "eplb simulat", "invalid choice", "'simulat'", "simulate"),
    case("eplb_ep_zero", ["eplb", "simulate", "--ep", "0", *SHORT], "--ep", "0", ">= 1"),
    case("eplb_ep_missing", ["eplb", "simulate", *SHORT], "--ep", "required"),
    case("eplb_bad_json", ["eplb", "simulate", "--ep", "8", "--eplb-config", "{bad", *SHORT], "eplb_config='{bad'",
         "not valid JSON"),
    case("eplb_unknown_policy", ["eplb", "simulate", "--ep", "8", "--policy", "nope", *SHORT], "--policy", "'nope'",
         "sticky"),
    case("eplb_uneven_experts", ["eplb", "simulate", "--ep", "8", "--experts", "10", "--steps", "4", "--layers", "2"],
         "num_redundant_experts=0", "valid num_redundant_experts", "6, 14"),
    case("eplb_trace_missing", ["eplb", "simulate", "--ep", "8", "--trace", "@D/no-trace.json"], "--trace",
         "no-trace.json", "does not exist"),
    case("eplb_trace_garbage", ["eplb", "simulate", "--ep", "8", "--trace", "@D/trace.json"], "--trace",
         "trace.json", "not an epkit EPLB trace"),
    case("eplb_skew_fraction", ["eplb", "simulate", "--ep", "8", "--drift-fraction", "2", *SHORT],
         "--drift-fraction", "2", "<= 1.0"),
    case("eplb_compare_policies", ["eplb", "compare", "--ep", "8", "--policies", "default,nope", *SHORT],
         "policy='nope'", "allowed: default"),
    case("eplb_redundant_no_experts", "eplb redundant --ep 8", "--experts", "--model"),
    case("eplb_redundant_model", "eplb redundant --ep 8 --model acme/nope", "model='acme/nope'", "bundled"),
    case("eplb_log_missing", "eplb log @D/no.log", "no.log", "does not exist"),
    # ---- epkit bench (a real listener at @URL: nothing may connect) ----------------------------------
    case("bench_no_model", "bench --base-url @URL", "--model", "required"),
    case("bench_rate_word", "bench --base-url @URL --model m --request-rate fast", "--request-rate", "'fast'",
         "1,4,inf", proc=True),
    case("bench_concurrency_zero", "bench --base-url @URL --model m --max-concurrency 4,0", "max_concurrency=0",
         ">= 1"),
    case("bench_concurrency_word", "bench --base-url @URL --model m --max-concurrency 4,many", "--max-concurrency",
         "'many'", "none/inf"),
    case("bench_extra_body_list", "bench --base-url @URL --model m --extra-body [1]", "--extra-body", "'[1]'",
         "JSON object"),
    case("bench_goodput_key", "bench --base-url @URL --model m --goodput latency:5", "--goodput", "'latency'",
         "ttft, tpot, e2el"),
    case("bench_port_range", "bench --port 99999 --model m", "--port", "'99999'", "1-65535"),
    case("bench_url_scheme", "bench --base-url localhost:8000 --model m", "--base-url", "'localhost:8000'", "http"),
    case("bench_dataset_needs_path", "bench --base-url @URL --model m --dataset-name sharegpt", "sharegpt",
         "--dataset-path", proc=True),
    case("bench_dataset_missing", "bench --base-url @URL --model m --dataset-name sharegpt --dataset-path @D/no.json",
         "--dataset-path", "no.json", "not a file"),
    case("bench_prompts_zero", "bench --base-url @URL --model m --num-prompts 0", "--num-prompts", "0", "> 0"),
    case("bench_percentile", "bench --base-url @URL --model m --metric-percentiles 50,150", "--metric-percentiles",
         "150", "[0, 100]"),
    # ---- epkit serve (owned by the engine; real processes, each with its own free port @PORT) -------
    case("serve_dp_zero", "serve epkit-tiny-moe --port @PORT --data-parallel-size 0", "data_parallel_size=0", ">= 1",
         proc=True),
    case("serve_unknown_model", "serve acme/nope --port @PORT", "model='acme/nope'", "bundled", proc=True),
    case("serve_eplb_json", "serve epkit-tiny-moe --port @PORT --eplb-config {bad", "--eplb-config",
         "not valid JSON", proc=True),
    case("serve_length_word", "serve epkit-tiny-moe --port @PORT --max-model-len abc", "--max-model-len", "'abc'",
         proc=True),
    case("serve_unknown_flag", "serve epkit-tiny-moe --port @PORT --no-such-flag", "unrecognized arguments",
         "--no-such-flag", proc=True),
    case("serve_port_range", "serve epkit-tiny-moe --port 99999", "port=99999", "65535", proc=True),
    case("serve_backend", "serve epkit-tiny-moe --port @PORT --all2all-backend magic", "all2all_backend='magic'",
         "allgather_reducescatter", proc=True),
    case("serve_utilization", "serve epkit-tiny-moe --port @PORT --gpu-memory-utilization 2",
         "gpu_memory_utilization=2", "(0, 1]", proc=True),
    # ---- epkit sweep: the vLLM executable --------------------------------------------------------------
    case("sweep_vllm_bin_not_string", "sweep @D/sweep_vllm_bin_list.yaml --dry-run", "vllm_bin=['vllm', 'serve']",
         "command line as a string"),
    case("sweep_vllm_bin_quote", ["sweep", "@D/sweep_vllm_missing.yaml", "--dry-run", "--vllm-bin", "'unclosed"],
         "vllm_bin=\"'unclosed\"", "not a valid command line"),
    case("sweep_vllm_bin_missing", "sweep @D/sweep_vllm_missing.yaml --dry-run", "/no/such/dir/vllm", "is not found",
         "vllm_bin:", "--vllm-bin", "EPKIT_VLLM_BIN"),
    # ---- epkit gate ------------------------------------------------------------------------------------
    case("gate_missing_folder", "gate @D/nope @D", "nope"),
    case("gate_bare_number", "gate @D @D --max-regression output_throughput=5", "output_throughput=5", "%"),
    case("gate_unknown_metric", "gate @D @D --max-regression ttft=5%", "ttft", "output_throughput"),
    # ---- epkit itself ----------------------------------------------------------------------------------
    case("epkit_unknown_command", "plna @D/nomodel.yaml", "unknown command 'plna'", "plan, serve", proc=True),
]


def test_enough_cases_for_every_entry_point():
    commands = {c.argv[0] for c in CASES}
    assert len(CASES) >= 40
    assert {"plan", "sweep", "report", "doctor", "eplb", "bench", "serve"} <= commands
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.proc for c in CASES) >= 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    """``epkit ARGV`` as the console script runs it (``sys.exit(main())``), in this process."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: status 2 after printing usage and the message
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _in_subprocess(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "epkit.cli", *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case once (processes in parallel); per case id: (status, stdout, stderr, folder)."""
    folder = tmp_path_factory.mktemp("malformed")
    for name, content in FILES.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content.replace("@D", str(folder)))
        else:
            path.write_text(yaml.safe_dump(json.loads(json.dumps(content).replace("@D", str(folder)))))
    (folder / "empty-folder").mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def argv_of(c: Case) -> list[str]:
        return [a.replace("@D", str(folder)).replace("@URL", url).replace("@PORT", str(_free_port())) for a in c.argv]

    cwd = os.getcwd()
    os.chdir(ROOT)  # report cases name results/sample as a user in a clone would
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            procs = {c.id: pool.submit(_in_subprocess, argv_of(c)) for c in CASES if c.proc}
            results = {c.id: _in_process(argv_of(c)) for c in CASES if not c.proc}
            results.update({cid: future.result() for cid, future in procs.items()})
    finally:
        os.chdir(cwd)
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
        conn.close()
        connected = True
    except BlockingIOError:
        connected = False
    listener.close()
    return {"results": results, "folder": folder, "bench_connected": connected}


def _message_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage block: what is left is the message."""
    lines, usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:") or line == "commands:":
            usage = True
            continue
        if usage and (not line.strip() or line.startswith(" ")):
            continue
        usage = False
        if line.strip():
            lines.append(line)
    return lines


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_malformed_input_gets_one_clear_message(outcomes, c):
    status, stdout, stderr = outcomes["results"][c.id]
    assert "Traceback" not in stderr, stderr
    assert status == 2, (status, stderr)
    message = _message_lines(stderr)
    assert len(message) == 1, stderr
    assert message[0].startswith("epkit"), message
    folder = str(outcomes["folder"])
    for piece in c.expect:
        assert piece.replace("@D", folder) in message[0], (piece, message[0])
    assert stdout == "", stdout  # no command, table or result was produced


def test_nothing_started_for_bad_input(outcomes):
    """No sweep wrote results, and bench never opened a connection to the server its URL names."""
    assert not (outcomes["folder"] / "results").exists()
    assert not outcomes["bench_connected"]


def _closed_pipe_run(argv: list[str]) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is already gone (`… | head -0` without the race)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300, cwd=ROOT)
    finally:
        os.close(write_end)


def test_closed_stdout_ends_quietly():
    """`epkit plan … --format json | head -1`: no BrokenPipeError traceback, the status of a SIGPIPE exit."""
    script = Path(sys.executable).with_name("epkit")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "epkit.cli"]
    spec = str(ROOT / "launchers/seed/two_node_dp16_deepep_ll.yaml")
    for argv in ([*prefix, "plan", spec, "--format", "json"],
                 [sys.executable, "-m", "epkit.cli", "eplb", "redundant", "--experts", "256", "--ep", "8"]):
        proc = _closed_pipe_run(argv)
        assert proc.stderr == "", proc.stderr
        assert proc.returncode == cli.EXIT_BROKEN_PIPE


def test_check_with_vllm_case_is_a_python_without_vllm():
    """The no-vLLM case uses this venv's Python, which must not have vLLM (it lives in its own venv)."""
    assert importlib.util.find_spec("vllm") is None


def test_doctor_exit_status_gates_a_script():
    """A port in use (a real listener here) fails the check and the exit status is 1, not 0."""
    from epkit.launch import doctor

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        status, stdout, stderr = _in_process(["doctor", "--ports", str(port), "--json"])
    checks = json.loads(stdout)
    assert status == 1 and "Traceback" not in stderr
    assert checks["ports"]["free"] == {str(port): False} and "ports" in checks["failed"] and checks["ok"] is False
    every_ok = {name: {"ok": True} for name in ("gpus", "network", "ports", "vllm")}
    assert doctor.failed({**every_ok, "prerequisites": {"NIXL": {"ok": True, "present": False, "required": False}}}) == []
    assert doctor.failed({**every_ok, "prerequisites": {"DeepEP": {"ok": False}}}) == ["DeepEP"]


def test_doctor_asks_for_the_kernels_of_the_target_release():
    """pplx-kernels only where the release still runs pplx; a backend narrows the list to its kernels."""
    from epkit.launch import doctor

    assert "pplx-kernels" in doctor.required_prerequisites("0.16.0", None)
    assert "pplx-kernels" not in doctor.required_prerequisites("0.32.0", None)
    assert {"DeepEP", "NVSHMEM", "DeepGEMM"} <= set(doctor.required_prerequisites("0.32.0", None))
    assert set(doctor.required_prerequisites("0.16.0", "pplx")) == {"pplx-kernels", "NVSHMEM"}
    assert doctor.required_prerequisites("0.32.0", "pplx") == {}  # runs allgather_reducescatter there
    assert set(doctor.required_prerequisites("0.32.0", "deepep_low_latency")) == {"DeepEP", "NVSHMEM"}
    assert "not needed" in doctor.not_needed_note("pplx-kernels", "0.32.0")
    assert doctor.not_needed_note("pplx-kernels", "0.16.0") is None
    checks = doctor.check_prerequisites("0.32.0", "allgather_reducescatter")
    assert not any(c["required"] for c in checks.values())
    if not checks["pplx-kernels"]["present"]:
        assert checks["pplx-kernels"]["hint"].startswith("not needed: vLLM 0.32.0")
