"""Workloads: lengths, seeds, shared prefixes, ShareGPT files, trace replay, tokenizer text prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epkit.bench.datasets import (DATASETS, RandomWorkload, SharedPrefixWorkload, ShareGPTWorkload, TraceWorkload,
                                  load_tokenizer, make_workload)


def test_random_lengths_lie_in_the_range_and_are_seeded():
    wl = RandomWorkload(num_prompts=500, input_len=100, output_len=50, range_ratio=0.2, seed=3)
    s = wl.sample()
    ins, outs = np.array([x.prompt_len for x in s]), np.array([x.output_len for x in s])
    assert ins.min() >= 80 and ins.max() <= 120 and outs.min() >= 40 and outs.max() <= 60
    assert ins.min() < 85 and ins.max() > 115                      # uniform over the whole range
    assert all(len(x.prompt) == x.prompt_len for x in s)           # token-id prompts
    assert [x.prompt for x in s[:3]] == [x.prompt for x in wl.sample()[:3]]
    assert [x.prompt for x in s[:3]] != [x.prompt for x in RandomWorkload(500, 100, 50, 0.2, seed=4).sample()[:3]]


def test_random_text_prompts_have_the_counted_length(byte_tokenizer_dir):
    tok = load_tokenizer(byte_tokenizer_dir)
    for x in RandomWorkload(num_prompts=20, input_len=64, output_len=8, prefix_len=16).sample(tok):
        assert isinstance(x.prompt, str)
        assert len(tok.encode(x.prompt, add_special_tokens=False)) == x.prompt_len


def test_shared_prefix_requests_share_their_prefixes():
    s = SharedPrefixWorkload(num_prompts=40, prefix_len=32, suffix_len=8, num_prefixes=4, output_len=5).sample()
    assert {tuple(x.prompt[:32]) for x in s}.__len__() == 4
    assert all(x.prompt_len == 40 and x.output_len == 5 for x in s)


def test_sharegpt_file(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"question number {i} " * 3},
                                {"from": "gpt", "value": "an answer " * (i + 1)}]} for i in range(10)]
    convs.append({"conversations": [{"from": "human", "value": "lonely"}]})  # one turn: skipped
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    s = ShareGPTWorkload(path=str(path), num_prompts=5).sample()
    assert len(s) == 5 and all(x.prompt_len == len(x.prompt.encode()) for x in s)
    assert {x.output_len for x in s} <= {len(("an answer " * (i + 1)).encode()) for i in range(10)}
    assert {x.output_len for x in ShareGPTWorkload(path=str(path), num_prompts=5, output_len=7).sample()} == {7}


def test_trace_replay_keeps_times_and_lengths(tmp_path):
    path = tmp_path / "mooncake.jsonl"
    path.write_text('{"timestamp": 2000, "input_length": 5, "output_length": 2, "hash_ids": [1]}\n'
                    '{"timestamp": 500, "input_length": 7, "output_length": 3, "hash_ids": [2]}\n')
    s = TraceWorkload(path=str(path)).sample()
    assert [(x.timestamp_s, x.prompt_len, x.output_len) for x in s] == [(0.0, 7, 3), (1.5, 5, 2)]


def test_registry_names_and_bad_parameters():
    assert {"random", "sharegpt", "prefix_repetition", "timed_trace"} <= set(DATASETS)
    assert isinstance(make_workload("random", num_prompts=3), RandomWorkload)
    with pytest.raises(ValueError, match="dataset='nope' is unknown"):
        make_workload("nope")
    with pytest.raises(ValueError, match=r"takes no \['inputlen'\]; valid keys"):
        make_workload("random", inputlen=3)
    with pytest.raises(ValueError, match="num_prompts=0 must be > 0"):
        RandomWorkload(num_prompts=0)
