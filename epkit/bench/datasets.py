"""Workloads: what to send. Each turns into a list of :class:`SampleRequest` with known lengths.

A workload is a frozen dataclass with a ``sample(tokenizer) -> list[SampleRequest]`` method
(the :class:`Workload` protocol); :data:`DATASETS` maps the names users type
(``--dataset-name``, YAML ``dataset:``) to the classes. Sampling follows ``vllm bench
serve``'s datasets where they overlap, so the same flags give the same lengths.

Prompts are token ids when no tokenizer is given (``/v1/completions`` accepts them), or
text decoded with the model's tokenizer (a path or hub id loaded with
``transformers.AutoTokenizer``) when one is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SampleRequest:
    """One request to send: its prompt, prompt length in tokens, output length to ask for.

    ``timestamp_s`` is set only by trace replays: the send time relative to the trace start.
    """

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    timestamp_s: float | None = None
    messages: list[dict] | None = None


@runtime_checkable
class Workload(Protocol):
    """Anything that can produce the requests of one run."""

    num_prompts: int

    def sample(self, tokenizer: Any | None = None) -> list[SampleRequest]: ...


def load_tokenizer(name_or_path: str | None):
    """Load a Hugging Face tokenizer by path or hub id, or return None for ``None``."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _token_pool(tokenizer, vocab_size: int) -> np.ndarray:
    if tokenizer is None:
        return np.arange(vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return np.array([t for t in range(tokenizer.vocab_size) if t not in special])


def _to_prompt(tokenizer, ids: list[int], rng: np.random.Generator | None = None,
               max_retry: int = 10) -> tuple[str | list[int], int]:
    """Token ids as the prompt (no tokenizer), or as text whose re-encoding has the same length.

    With a tokenizer this is vLLM's ``gen_prompt_decode_to_target_len``: decode, re-encode,
    pad with random ids or truncate, up to ``max_retry`` times; the length is the final count.
    """
    if tokenizer is None:
        return ids, len(ids)
    target, seq, tries = len(ids), list(ids), max_retry
    while True:
        prompt = tokenizer.decode(seq)
        seq = tokenizer.encode(prompt, add_special_tokens=False)
        if tries <= 0 or len(seq) == target:
            return prompt, len(seq)
        if len(seq) < target:
            pad = target - len(seq)
            seq.extend((rng.integers(0, tokenizer.vocab_size, size=pad) if rng is not None
                        else np.random.randint(0, tokenizer.vocab_size, size=pad)).tolist())
        else:
            seq = seq[:target]
        tries -= 1


@dataclass(frozen=True)
class RandomWorkload:
    """Random prompts of ``input_len`` tokens and ``output_len`` outputs, each drawn uniformly
    within ``±range_ratio`` (vLLM's ``--dataset-name random``); ``prefix_len`` shared tokens
    lead every prompt. Without a tokenizer, token ids are drawn from ``[0, vocab_size)``."""

    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("num_prompts", self.num_prompts)
        _check_positive("input_len", self.input_len)
        _check_positive("output_len", self.output_len)
        _check_positive("prefix_len", self.prefix_len, allow_zero=True)
        _check_positive("vocab_size", self.vocab_size)
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio={self.range_ratio!r} must be in [0, 1)")

    def lengths(self, rng: np.random.Generator, num_special_tokens: int = 0,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_lens, output_lens, offsets), drawn exactly as vLLM's ``get_sampling_params``."""
        real_in = max(0, self.input_len - num_special_tokens)
        in_lo, in_hi = math.floor(real_in * (1 - self.range_ratio)), math.ceil(real_in * (1 + self.range_ratio))
        out_lo = max(math.floor(self.output_len * (1 - self.range_ratio)), 1)
        out_hi = max(math.ceil(self.output_len * (1 + self.range_ratio)), 1)
        input_lens = rng.integers(in_lo, in_hi + 1, size=self.num_prompts)
        output_lens = rng.integers(out_lo, out_hi + 1, size=self.num_prompts)
        offsets = rng.integers(0, vocab_size or self.vocab_size, size=self.num_prompts)
        return input_lens, output_lens, offsets

    def sample(self, tokenizer: Any | None = None) -> list[SampleRequest]:
        # One generator drawn in vLLM's order (lengths, prefix, per-prompt fix-ups): with the
        # same tokenizer and seed, the prompts are the ones `vllm bench serve` sends.
        rng = np.random.default_rng(self.seed)
        pool = _token_pool(tokenizer, self.vocab_size)
        special = int(tokenizer.num_special_tokens_to_add()) if tokenizer is not None else 0
        vocab = tokenizer.vocab_size if tokenizer is not None else self.vocab_size
        input_lens, output_lens, offsets = self.lengths(rng, special, vocab)
        prefix: list[int] = []
        if self.prefix_len > 0:
            prefix = pool[rng.integers(0, len(pool), size=self.prefix_len)].tolist()
            if tokenizer is not None:
                text, _ = _to_prompt(tokenizer, prefix, rng)
                prefix = tokenizer.encode(text, add_special_tokens=False)
        out = []
        for i in range(self.num_prompts):
            inner = pool[(offsets[i] + i + np.arange(input_lens[i])) % len(pool)].tolist()
            prompt, n = _to_prompt(tokenizer, prefix + inner, rng)
            if n < 1:
                raise ValueError(f"input_len={self.input_len} with range_ratio={self.range_ratio} gave an empty prompt")
            out.append(SampleRequest(prompt, n, int(output_lens[i])))
        return out


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """Many requests sharing long prefixes: ``num_prefixes`` random prefixes of ``prefix_len``
    tokens, each followed by a distinct ``suffix_len``-token suffix (vLLM's ``prefix_repetition``)."""

    num_prompts: int = 1000
    prefix_len: int = 256
    suffix_len: int = 256
    num_prefixes: int = 10
    output_len: int = 128
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "prefix_len", "num_prefixes", "output_len", "vocab_size"):
            _check_positive(name, getattr(self, name))
        _check_positive("suffix_len", self.suffix_len, allow_zero=True)

    def sample(self, tokenizer: Any | None = None) -> list[SampleRequest]:
        rng = np.random.default_rng(self.seed)
        pool = _token_pool(tokenizer, self.vocab_size)
        prefixes = [rng.choice(pool, size=self.prefix_len).tolist() for _ in range(self.num_prefixes)]
        out = []
        for i in range(self.num_prompts):
            ids = prefixes[i % self.num_prefixes] + rng.choice(pool, size=self.suffix_len).tolist()
            prompt, n = _to_prompt(tokenizer, ids, rng)
            out.append(SampleRequest(prompt, n, self.output_len))
        rng.shuffle(out)
        return out


@dataclass(frozen=True)
class ShareGPTWorkload:
    """Conversations from a ShareGPT-format JSON file (a list of ``{"conversations": [{"from",
    "value"}, …]}``): the first turn is the prompt, the second's token count the output length
    unless ``output_len`` fixes it. Needs a tokenizer unless ``output_len`` is set (lengths
    then count UTF-8 bytes). Conversations are shuffled with ``seed``, as vLLM does."""

    path: str = ""
    num_prompts: int = 1000
    output_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path='' : ShareGPTWorkload needs the path of a ShareGPT JSON file")
        _check_positive("num_prompts", self.num_prompts)

    def sample(self, tokenizer: Any | None = None) -> list[SampleRequest]:
        path = Path(self.path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"path={self.path!r}: cannot read a ShareGPT JSON file ({e})") from e
        convs = [d["conversations"] for d in data if isinstance(d, dict) and len(d.get("conversations", [])) >= 2]
        if not convs:
            raise ValueError(f"path={self.path!r} holds no conversation with at least two turns")
        order = np.random.default_rng(self.seed).permutation(len(convs))

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else len(text.encode())

        out = []
        for j in order:
            prompt, completion = convs[j][0]["value"], convs[j][1]["value"]
            n_in = count(prompt)
            n_out = self.output_len or count(completion)
            if n_in < 4 or n_out < 4 and self.output_len is None:
                continue  # vLLM's filter: too-short sequences say nothing about serving
            out.append(SampleRequest(prompt, n_in, n_out))
            if len(out) == self.num_prompts:
                break
        return out


@dataclass(frozen=True)
class TraceWorkload:
    """Fixed-schedule replay of a JSONL trace, one request a line with ``timestamp``,
    ``input_length`` and ``output_length`` (Mooncake's format; other field names via the
    ``*_key`` fields). ``time_scale_s`` converts timestamps to seconds (Mooncake: ms, 0.001).
    Requests are sent at their timestamps, whatever the request rate."""

    path: str = ""
    num_prompts: int = 0
    time_scale_s: float = 0.001
    timestamp_key: str = "timestamp"
    input_key: str = "input_length"
    output_key: str = "output_length"
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path='' : TraceWorkload needs the path of a JSONL trace")
        _check_positive("num_prompts", self.num_prompts, allow_zero=True)
        _check_positive("time_scale_s", self.time_scale_s)

    def sample(self, tokenizer: Any | None = None) -> list[SampleRequest]:
        rows = []
        try:
            lines = Path(self.path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"path={self.path!r}: cannot read the trace ({e})") from e
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((float(row[self.timestamp_key]), int(row[self.input_key]), int(row[self.output_key])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}:{lineno}: need {self.timestamp_key!r}, {self.input_key!r}, "
                                 f"{self.output_key!r} ({type(e).__name__}: {e})") from e
        if not rows:
            raise ValueError(f"path={self.path!r} holds no request")
        rows.sort()
        if self.num_prompts:
            rows = rows[: self.num_prompts]
        rng = np.random.default_rng(self.seed)
        pool = _token_pool(tokenizer, self.vocab_size)
        t0 = rows[0][0]
        out = []
        for ts, n_in, n_out in rows:
            prompt, n = _to_prompt(tokenizer, rng.choice(pool, size=max(n_in, 1)).tolist(), rng)
            out.append(SampleRequest(prompt, n, max(n_out, 1), timestamp_s=(ts - t0) * self.time_scale_s))
        return out


DATASETS: dict[str, type] = {
    "random": RandomWorkload,
    "prefix_repetition": SharedPrefixWorkload,
    "shared_prefix": SharedPrefixWorkload,
    "sharegpt": ShareGPTWorkload,
    "timed_trace": TraceWorkload,
    "trace": TraceWorkload,
}


def make_workload(name: str, **params) -> Workload:
    """Build the workload a user named, checking the name and the parameter names."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is unknown; choose from {sorted(DATASETS)}")
    cls = DATASETS[name]
    fields = set(cls.__dataclass_fields__)
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"dataset {name!r} takes no {sorted(unknown)}; valid keys: {sorted(fields)}")
    return cls(**params)


def describe(workload: Workload) -> dict:
    """The workload as plain data for result metadata: its dataset name and parameters."""
    name = next(k for k, v in DATASETS.items() if isinstance(workload, v))
    return {"dataset": name, **{k: getattr(workload, k) for k in workload.__dataclass_fields__}}
