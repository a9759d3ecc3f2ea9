"""vLLM log lines (both formats) and epkit trace files (NPZ and JSON)."""

import json

import numpy as np
import pytest

from epkit.eplb import Trace, read_trace, read_vllm_log, simulate, write_trace

LOG = """\
INFO 06-01 10:00:00 [eplb_state.py:420] EPLB step: avg_tokens=1234.50, max_tokens=2000, balancedness=0.6173
INFO 06-01 10:00:05 [eplb_state.py:530] Rearranged experts (sync mode)  in 1.23 s.
(EngineCore_DP0 pid=1) INFO 10-20 [eplb_state.py:600] EPLB step: 12 for model deepseek-ai/DeepSeek-V3-0324: avg_tokens=900.00, max_tokens=1000, balancedness=0.9000, steps until the next rearrangement: 2988
INFO EPLB step: 7 for model m: avg_tokens=10.00, max_tokens=20, balancedness=0.5000
unrelated line
"""


def test_reads_old_and_new_vllm_log_formats():
    df = read_vllm_log(LOG)
    assert df.format.tolist() == ["old", "new", "new"]
    assert df.balancedness.tolist() == [0.6173, 0.9, 0.5]
    assert df.avg_tokens.tolist() == [1234.5, 900.0, 10.0]
    assert df.step.tolist()[1:] == [12, 7]
    assert df.model[1] == "deepseek-ai/DeepSeek-V3-0324"
    assert df.steps_until_rearrangement[1] == 2988 and df.steps_until_rearrangement.isna()[2]
    assert df.rearranged_before.tolist() == [0, 1, 1]


def test_log_from_file(tmp_path):
    path = tmp_path / "vllm.log"
    path.write_text(LOG)
    assert len(read_vllm_log(path)) == 3


def test_physical_npz_trace_folds_replicas_into_logical(tmp_path):
    phy2log = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])  # 2 layers, 3 experts, 4 slots
    load = np.array([[[5, 1, 2, 7], [3, 4, 6, 1]], [[1, 1, 1, 1], [0, 0, 9, 9]]])  # 2 steps
    path = write_trace(tmp_path / "t.npz", load, physical_to_logical=phy2log, step=[100, 101])
    trace = read_trace(path)
    assert trace.load.shape == (2, 2, 3)
    assert trace.load[0, 0].tolist() == [12, 1, 2] and trace.load[0, 1].tolist() == [6, 5, 3]
    assert trace.load[1, 1].tolist() == [9, 9, 0]
    assert trace.step.tolist() == [100, 101]


def test_json_trace_with_per_step_maps(tmp_path):
    doc = {
        "format": "epkit-eplb-trace", "version": 1, "kind": "physical", "num_logical_experts": 2,
        "physical_to_logical": [[0, 1, 0, 1]],
        "steps": [
            {"step": 0, "load": [[1, 2, 3, 4]]},
            {"step": 1, "load": [[1, 2, 3, 4]], "physical_to_logical": [[1, 1, 0, 0]]},
        ],
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    trace = read_trace(path)
    assert trace.load[:, 0].tolist() == [[4, 6], [7, 3]]
    df = simulate(trace, {"step_interval": 100}, num_ranks=2)
    assert len(df) == 2


def test_bad_trace_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="'format' must be 'epkit-eplb-trace'"):
        read_trace(path)
    with pytest.raises(ValueError, match=r"shape \[steps, layers, experts\]"):
        Trace(np.ones((2, 3)))
