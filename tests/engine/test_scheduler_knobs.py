"""The scheduler's prefill knobs: vLLM 0.32's --long-prefill-token-threshold (and -adaptive), the older
--max-num-partial-prefills / --max-long-partial-prefills, and decodes first within the token budget."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from epkit.engine.block_manager import BlockManager
from epkit.engine.cli import config_from_args
from epkit.engine.scheduler import Scheduler, SchedulerConfig
from epkit.engine.sequence import EngineRequest, SamplingParams
from epkit.errors import EngineError

EOS = 1


def make(budget: int, threshold: int = 0, **knobs) -> Scheduler:
    return Scheduler(SchedulerConfig(16, budget, 1024, EOS, True, threshold, **knobs), BlockManager(512, 4))


def add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 40) -> None:
    s.add(EngineRequest(rid, tuple(3 + i % 50 for i in range(prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                                          ignore_eos=True)))


def step(s: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule one step, sample token 7 for every row that reaches its end; returns (id, new tokens, tokens left
    before the step) per row, after checking the budget and that every running decode got its row."""
    decodes = {q.request_id for q in s.running if q.num_tokens - q.num_computed_tokens == 1}
    batch = s.schedule()
    rows = [(q.request_id, n, q.num_tokens - q.num_computed_tokens) for q, n in batch]
    assert sum(n for _, n, _ in rows) <= s.config.max_num_batched_tokens
    assert decodes <= {rid for rid, _, _ in rows}, f"a decode was left out: {rows}"
    s.postprocess(batch, {q.request_id: 7 for q, n in batch if s.needs_sampling(q, n)})
    return rows


def test_a_long_prompt_among_decodes_is_chunked_at_the_threshold_and_every_decode_runs_each_step():
    s = make(budget=64, threshold=16)
    for i in range(6):
        add(s, f"short{i}", 4)
    step(s)  # six short prompts, then they decode
    add(s, "long", 300)
    chunks = []
    while any(q.request_id == "long" and q.num_computed_tokens < 300 for q in [*s.running, *s.waiting]):
        rows = step(s)  # checks that every running decode has its row
        chunks += [n for rid, n, _ in rows if rid == "long"]
        assert [rid for rid, n, _ in rows if n == 1] == [f"short{i}" for i in range(6)]
    assert max(chunks) <= 16 and sum(chunks) == 300


def test_alone_a_long_prompt_takes_the_whole_budget_as_in_vllm():
    s = make(budget=64, threshold=16)
    add(s, "long", 300)
    assert step(s) == [("long", 64, 300)]  # nobody to starve: no cap


def test_adaptive_threshold_is_floored_at_the_fair_share_of_the_budget():
    s = make(budget=64, threshold=4, long_prefill_token_threshold_adaptive=True)
    add(s, "a", 100)
    add(s, "b", 100)
    assert [n for _, n, _ in step(s)] == [32, 32]  # max(4, 64 // 2)


def test_decodes_go_first_within_the_budget_even_behind_a_running_prefill():
    s = make(budget=8, threshold=4)
    add(s, "long", 100)
    add(s, "s1", 2)
    add(s, "s2", 2)
    assert step(s) == [("long", 4, 100), ("s1", 2, 2), ("s2", 2, 2)]
    s.config = dataclasses.replace(s.config, long_prefill_token_threshold=0)  # no cap: only the reservation
    assert step(s) == [("long", 6, 96), ("s1", 1, 1), ("s2", 1, 1)]  # 8 - one token per decode behind it


@pytest.mark.parametrize("many, long, expect_many, expect_long", [(None, None, 5, 4), (2, 1, 2, 1), (3, 2, 3, 2)])
def test_partial_prefills_stay_within_the_limits(many, long, expect_many, expect_long):
    s = make(budget=128, threshold=16, max_num_partial_prefills=many, max_long_partial_prefills=long)
    for i in range(4):
        add(s, f"p{i}", 90, max_tokens=4)
    add(s, "short", 8, max_tokens=4)
    most = most_long = 0
    for n in range(40):
        rows = step(s)
        if n == 0 and long is not None and long < (many or 99):  # the short prompt passes the long ones waiting
            assert "short" in [rid for rid, _, _ in rows], rows
        prefills = [(rid, left) for rid, n, left in rows if left > 1]
        most, most_long = max(most, len(prefills)), max(most_long, sum(left > 16 for _, left in prefills))
        assert len(prefills) <= (many or 99) and sum(left > 16 for _, left in prefills) <= (long or 99), rows
        if not s.has_work:
            break
    assert not s.has_work
    assert (most, most_long) == (expect_many, expect_long)


@pytest.mark.parametrize("args, needle", [
    (["--long-prefill-token-threshold", "-1"], "long_prefill_token_threshold=-1 must be an integer >= 0"),
    (["--max-model-len", "100", "--long-prefill-token-threshold", "200"],
     "long_prefill_token_threshold=200 cannot be greater than max_model_len=100"),
    (["--max-num-partial-prefills", "0"], "max_num_partial_prefills=0 must be an integer >= 1"),
    (["--max-num-partial-prefills", "1", "--max-long-partial-prefills", "2"],
     "max_long_partial_prefills=2 must be <= max_num_partial_prefills=1"),
    (["--no-enable-chunked-prefill", "--max-num-partial-prefills", "2"], "max_num_partial_prefills=2 needs chunked"),
])
def test_bad_knob_values_name_the_flag_value_and_what_is_allowed(args, needle):
    with pytest.raises(EngineError, match=needle):
        config_from_args(["epkit-tiny-moe", *args])
    cfg, _ = config_from_args(["m", "--long-prefill-token-threshold", "64", "--long-prefill-token-threshold-adaptive",
                               "--max-num-partial-prefills", "2", "--max-long-partial-prefills", "1"])
    assert (cfg.long_prefill_token_threshold, cfg.long_prefill_token_threshold_adaptive,
            cfg.max_num_partial_prefills, cfg.max_long_partial_prefills) == (64, True, 2, 1)


def test_greedy_output_is_unchanged_with_the_knobs_set(deploy):
    """A 400-token prompt arriving among short requests that decode: the same tokens with the knobs as without."""
    prompts = [[3 + (i * 7) % 200 for i in range(400)]] + [[5 + j, 9, 11 + j] for j in range(4)]
    knobs = ["--long-prefill-token-threshold", "16", "--max-num-partial-prefills", "2",
             "--max-long-partial-prefills", "1", "--max-num-batched-tokens", "64"]
    outputs = []
    for extra in ([], knobs):
        d = deploy(extra)
        got: dict[int, list[int]] = {}

        def one(i: int) -> None:
            got[i] = d.complete(prompts[i], max_tokens=24)["choices"][0]["token_ids"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 5)]
        for t in threads:
            t.start()
        one(0)
        for t in threads:
            t.join()
        outputs.append(got)
        d.stop()
    assert outputs[0] == outputs[1]
