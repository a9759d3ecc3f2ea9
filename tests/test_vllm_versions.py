"""epkit.vllm.versions: the per-release table of --all2all-backend / EPLB facts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from epkit.errors import TopologyError
from epkit.vllm.versions import (
    DEFAULT_VLLM_VERSION,
    FIRST_CLI_RELEASE,
    RELEASES,
    VllmRelease,
    all_backends,
    check_backend,
    release,
)

AGRS = "allgather_reducescatter"


# --- the table itself -------------------------------------------------------------------------

def test_required_releases_present_and_sourced():
    for v in ("0.11.1", "0.16.0", "0.17.0", "0.19.0", "0.23.0", "0.24.0", "0.26.0", "0.31.0",
              "0.32.0"):
        assert v in RELEASES, v
    assert DEFAULT_VLLM_VERSION == "0.32.0"
    assert FIRST_CLI_RELEASE == min(RELEASES, key=lambda v: RELEASES[v].key())
    for v, r in RELEASES.items():
        assert isinstance(r, VllmRelease) and r.version == v
        assert f"vllm-{v} wheel" in r.source and "vllm/config/parallel.py:" in r.source
        assert r.default_backend == AGRS and AGRS in r.backends
        # replaced backends are accepted values, and run as something real
        assert set(r.replaced) <= r.backends
        assert all(t in r.backends and t not in r.replaced for t in r.replaced.values())
        assert set(r.aliases) <= r.backends and not (r.internal_backends & r.backends)
        assert {"window_size", "step_interval", "num_redundant_experts",
                "log_balancedness"} <= set(r.eplb_keys)
        assert r.eplb_keys["num_redundant_experts"] == 0
        assert r.enable_eplb_flag and r.eplb_dotted_flags
        assert r.eplb_requires_ep and r.eplb_even_split


def test_rows_are_immutable():
    r = release("0.32.0")
    with pytest.raises(TypeError):
        r.replaced["deepep_v2"] = AGRS  # type: ignore[index]
    with pytest.raises(TypeError):
        r.eplb_keys["use_async"] = False  # type: ignore[index]


def test_026_and_032_rows_match_observed_facts():
    for v in ("0.26.0", "0.32.0"):
        r = release(v)
        assert {"pplx", "naive"} <= r.backends
        assert dict(r.replaced) == {"pplx": AGRS, "naive": AGRS}
        assert r.eplb_keys["use_async"] is True
        assert r.eplb_keys["window_size"] == 1000 and r.eplb_keys["step_interval"] == 3000
        assert r.eplb_keys["communicator"] is None
    assert "moonep" not in release("0.26.0").backends
    assert "moonep" in release("0.32.0").backends
    assert "passthrough" in release("0.32.0").internal_backends
    assert "passthrough" not in release("0.32.0").backends
    assert "enable_migration_batching" in release("0.32.0").eplb_keys
    assert "enable_migration_batching" not in release("0.26.0").eplb_keys


def test_pplx_and_naive_history():
    # both real up to 0.16.x
    for v in ("0.11.1", "0.14.0", "0.16.0"):
        r = release(v)
        assert {"pplx", "naive"} <= r.backends and not r.replaced
    # pplx replaced in 0.17.0, naive still real through 0.18.x
    for v in ("0.17.0", "0.18.1"):
        assert dict(release(v).replaced) == {"pplx": AGRS}
    # both replaced from 0.19.0 on
    for v in ("0.19.0", "0.22.0", "0.33.0"):
        assert dict(release(v).replaced) == {"pplx": AGRS, "naive": AGRS}


def test_new_backends_appear_when_recorded():
    def first(b):
        return min((r for r in RELEASES.values() if b in r.backends), key=VllmRelease.key).version

    assert first("mori") == "0.15.0"
    assert first("nixl_ep") == "0.18.0"
    assert first("flashinfer_nvlink_one_sided") == "0.18.0"
    assert first("flashinfer_nvlink_two_sided") == "0.18.0"
    assert first("mori_high_throughput") == first("mori_low_latency") == "0.23.0"
    assert first("deepep_v2") == "0.24.0"
    assert first("moonep") == "0.31.0"
    assert "mori" not in release("0.23.0").backends  # renamed, not aliased


def test_use_async_default_flip():
    assert "use_async" not in release("0.11.2").eplb_keys
    assert release("0.12.0").eplb_keys["use_async"] is False
    assert release("0.22.1").eplb_keys["use_async"] is False
    assert release("0.23.0").eplb_keys["use_async"] is True


def test_all_backends_is_union():
    u = all_backends()
    assert {"pplx", "naive", "mori", "deepep_v2", "moonep", "nixl_ep",
            "flashinfer_nvlink_one_sided", "mori_low_latency"} <= u
    assert "passthrough" not in u
    for r in RELEASES.values():
        assert r.backends <= u


# --- release() -----------------------------------------------------------------------------------

def test_release_exact_and_mapped():
    assert release("0.26.0").version == "0.26.0"
    assert release("v0.32.0").version == "0.32.0"
    assert release("0.32.0+cu129").version == "0.32.0"
    assert release("0.18.2").version == "0.18.1"  # newest known <= it
    assert release("0.99.0").version == max(RELEASES, key=lambda v: RELEASES[v].key())
    assert release("0.32.0rc1").version == "0.31.0"  # pre-release precedes the release


@pytest.mark.parametrize("bad", ["0.11.0", "0.10.1.1", "0.9.2"])
def test_release_older_than_table_errors(bad):
    with pytest.raises(TopologyError) as e:
        release(bad)
    msg = str(e.value)
    assert "vllm_version" in msg and bad in msg and "VLLM_ALL2ALL_BACKEND" in msg
    assert "0.26.0" in msg and "0.32.0" in msg  # known versions listed


@pytest.mark.parametrize("bad", ["latest", "", "zero.one", None])
def test_release_garbage_errors(bad):
    with pytest.raises(TopologyError) as e:
        release(bad)  # type: ignore[arg-type]
    assert "vllm_version" in str(e.value) and "0.32.0" in str(e.value)


# --- check_backend() -----------------------------------------------------------------------------

def test_032_refuses_replaced_pplx_unless_opted_in():
    with pytest.raises(TopologyError) as e:
        check_backend("0.32.0", "pplx")
    msg = str(e.value)
    assert "all2all_backend" in msg and "'pplx'" in msg and "0.32.0" in msg
    assert AGRS in msg and "allow_replaced_backend: true" in msg
    assert "deepep_low_latency" in msg  # allowed values named
    warnings = check_backend("0.32.0", "pplx", allow_replaced=True)
    assert len(warnings) == 1 and "falls back" in warnings[0] and AGRS in warnings[0]


def test_naive_refused_in_026_but_real_in_018():
    with pytest.raises(TopologyError):
        check_backend("0.26.0", "naive")
    assert check_backend("0.18.0", "naive") == []
    with pytest.raises(TopologyError):
        check_backend("0.18.0", "pplx")


def test_older_release_accepts_pplx_as_real():
    assert check_backend("0.16.0", "pplx") == []
    assert check_backend("0.11.1", "pplx") == []


def test_deepep_v2_only_in_newer():
    assert check_backend("0.24.0", "deepep_v2") == []
    assert check_backend("0.32.0", "deepep_v2") == []
    with pytest.raises(TopologyError) as e:
        check_backend("0.22.0", "deepep_v2")
    msg = str(e.value)
    assert "all2all_backend" in msg and "deepep_v2" in msg and "0.22.0" in msg
    assert "allowed values" in msg and "nixl_ep" in msg


def test_unknown_backend_and_internal_backend_rejected():
    with pytest.raises(TopologyError, match="all2all_backend"):
        check_backend("0.32.0", "bogus")
    with pytest.raises(TopologyError, match="internal"):
        check_backend("0.32.0", "passthrough")
    with pytest.raises(TopologyError, match="0.15.0..0.22.1"):
        check_backend("0.26.0", "mori")


def test_alias_warns():
    w = check_backend("0.32.0", "flashinfer_all2allv")
    assert len(w) == 1 and "flashinfer_nvlink_two_sided" in w[0]
    assert check_backend("0.17.0", "flashinfer_all2allv") == []


def test_mapped_version_warns():
    w = check_backend("0.18.2", "naive")
    assert any("0.18.1" in x and "not in epkit's table" in x for x in w)
    with pytest.raises(TopologyError, match="vllm_version"):
        check_backend("0.10.0", "naive")


# --- against the installed vLLM 0.32.0 ---------------------------------------------------------

_PROBE = r"""
import dataclasses, json, sys, typing
import vllm.platforms as P
from vllm.platforms.cpu import CpuPlatform
P._current_platform = CpuPlatform()
import vllm
from vllm.config.parallel import All2AllBackend, EPLBConfig, ParallelConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
act = [a for a in parser._actions if "--all2all-backend" in a.option_strings][0]
eplb = EPLBConfig()
out = {
    "version": vllm.__version__,
    "literal": list(typing.get_args(All2AllBackend)),
    "cli_choices": list(act.choices),
    "cli_default": act.default,
    "eplb": {f.name: getattr(eplb, f.name) for f in dataclasses.fields(EPLBConfig)},
    "has_enable_eplb": any("--enable-eplb" in a.option_strings for a in parser._actions),
}
out["resolved"] = {b: ParallelConfig(all2all_backend=b).all2all_backend for b in act.choices}
ns = parser.parse_args(["--enable-eplb", "--eplb-config.window_size", "7"])
out["dotted_window_size"] = ns.eplb_config.window_size if hasattr(ns.eplb_config, "window_size") \
    else dict(ns.eplb_config)["window_size"]
print("PROBE " + json.dumps(out))
"""


def _vllm_python() -> Path:
    venv = Path(os.environ.get("EPKIT_VLLM_VENV", Path.home() / ".cache/epkit/vllm-venv"))
    return Path(os.environ.get("EPKIT_VLLM_PYTHON", venv / "bin/python"))


def test_table_matches_installed_vllm_032():
    python = _vllm_python()
    if not python.exists():
        pytest.fail(f"no vLLM venv at {python}: run `bash scripts/vllm_venv.sh` "
                    "(the project's test command installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                          timeout=480, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, (
        f"probe failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    got = json.loads(lines[-1][len("PROBE "):])
    assert got["version"] == "0.32.0", (
        f"venv {python} has vLLM {got['version']}, expected 0.32.0: rerun "
        "`bash scripts/vllm_venv.sh`")

    row = release("0.32.0")
    assert set(got["cli_choices"]) == set(row.backends)
    assert set(got["literal"]) == set(row.backends) | set(row.internal_backends)
    assert got["cli_default"] == row.default_backend
    replaced = {b: r for b, r in got["resolved"].items() if r != b}
    assert replaced == dict(row.replaced)
    assert got["eplb"] == dict(row.eplb_keys)
    assert got["has_enable_eplb"] is row.enable_eplb_flag
    assert got["dotted_window_size"] == 7 and row.eplb_dotted_flags
