"""Every `vllm serve` command in the seed document renders flag-for-flag from launchers/seed/."""

import json
import os
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest

from epkit.topology.render import render
from epkit.topology.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests/data/expert_parallel_deployment.md"
GOLDEN = ROOT / "tests/golden"
SPECS = sorted((ROOT / "launchers/seed").glob("*.yaml"))


def seed_commands() -> list[list[str]]:
    """The `vllm serve` commands of the seed's bash blocks, comments stripped, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", SEED.read_text(), flags=re.S):
        lines = []
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("#"):
                if lines:
                    commands.append(lines)
                    lines = []
                continue
            line = re.sub(r"\s+#.*$", "", line.replace(" \\", " ")).strip()
            if line:
                lines.append(line)
        if lines:
            commands.append(lines)
    argvs = [shlex.split(" ".join(c)) for c in commands]
    return [a for a in argvs if a[:2] == ["vllm", "serve"]]


def pairs(argv: list[str]) -> Counter:
    """(flag, value) pairs of an argv; `--flag=value` and `--flag value` are the same."""
    out, i = Counter(), 3
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        out[(flag, value)] += 1
        i += 1
    return out


def rendered(spec_name: str, node: int = 0) -> list[str]:
    spec = load_spec(ROOT / "launchers/seed" / spec_name)
    return list(render(spec.topology)[node].argv)


def test_seed_has_six_commands():
    cmds = seed_commands()
    assert len(cmds) == 6, cmds


def test_single_node_pplx_exact():
    seed = seed_commands()[0]
    assert rendered("single_node_dp8_pplx.yaml")[:3] == seed[:3]
    assert pairs(rendered("single_node_dp8_pplx.yaml")) == pairs(seed)


def test_two_node_primary_and_headless_exact():
    _, node1, node2, *_ = seed_commands()
    assert pairs(rendered("two_node_dp16_deepep_ll.yaml", 0)) == pairs(node1)
    assert pairs(rendered("two_node_dp16_deepep_ll.yaml", 1)) == pairs(node2)
    assert ("--data-parallel-start-rank", "8") in pairs(rendered("two_node_dp16_deepep_ll.yaml", 1))
    launches = render(load_spec(ROOT / "launchers/seed/two_node_dp16_deepep_ll.yaml").topology)
    assert [l.role for l in launches] == ["primary", "headless"]
    assert all(l.env == {"GLOO_SOCKET_IFNAME": "eth0"} for l in launches)


@pytest.mark.parametrize("spec,index", [("eplb_qwen3_json.yaml", 3), ("eplb_qwen3_dotted.yaml", 4)])
def test_qwen_eplb_json_and_dotted(spec, index):
    seed = pairs(seed_commands()[index])
    ours = pairs(rendered(spec))
    # The seed's snippet shows only EPLB flags; vLLM needs EP for EPLB, so the spec adds DP=2 + EP.
    assert ours - seed == Counter({("--tensor-parallel-size", "1"): 1, ("--data-parallel-size", "2"): 1,
                                   ("--enable-expert-parallel", ""): 1})
    assert seed - ours == Counter()


def test_qwen_eplb_json_is_byte_identical_to_seed():
    argv = rendered("eplb_qwen3_json.yaml")
    seed = seed_commands()[3]
    assert argv[argv.index("--eplb-config") + 1] == seed[seed.index("--eplb-config") + 1]


def test_deepseek_eplb_differs_only_in_the_invalid_redundant_count():
    seed = pairs(seed_commands()[5])
    ours = pairs(rendered("eplb_deepseek_single_node.yaml"))
    assert {f for f, _ in seed} == {f for f, _ in ours}
    seed_json = json.loads(next(v for f, v in seed if f == "--eplb-config"))
    our_json = json.loads(next(v for f, v in ours if f == "--eplb-config"))
    assert seed_json["num_redundant_experts"] == 2 and our_json["num_redundant_experts"] == 8
    assert {k: v for k, v in seed_json.items() if k != "num_redundant_experts"} == \
        {k: v for k, v in our_json.items() if k != "num_redundant_experts"}


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_golden_files(spec_path):
    """Rendered argv and env per node; regenerate on purpose with EPKIT_REGEN_GOLDEN=1."""
    launches = render(load_spec(spec_path).topology)
    got = [{"node": l.node_index, "role": l.role, "argv": list(l.argv), "env": dict(l.env)} for l in launches]
    golden = GOLDEN / f"{spec_path.stem}.json"
    if os.environ.get("EPKIT_REGEN_GOLDEN") == "1":
        golden.write_text(json.dumps(got, indent=1) + "\n")
    assert golden.exists(), f"missing {golden}; run with EPKIT_REGEN_GOLDEN=1 once"
    assert json.loads(golden.read_text()) == got
