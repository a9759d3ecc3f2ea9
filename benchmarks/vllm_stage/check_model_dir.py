"""Check that a model folder's tokenizer serves `vllm bench serve`: loadable, full vocabulary, exact prompts.

1. ``transformers.AutoTokenizer`` loads the folder (vLLM loads tokenizers through it) and its
   length equals ``config.json``'s ``vocab_size``; text round-trips.
2. With ``--random-dataset`` (needs an importable ``vllm``): vLLM's own ``RandomDataset`` draws the
   benchmark's prompts (512 tokens; the warm-up and measured seeds of the retired ``vllm_vs_engine.sh``, 101, 202 and 303) and
   every prompt re-encodes to exactly 512 tokens, so both servers see 512-token prompts.

    python check_model_dir.py DIR [--random-dataset]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

SEEDS = {101: 400, 202: 400, 303: 256}  # warm-up, rate inf, concurrency 64: seed -> prompts


def check_tokenizer(model_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    problems = []
    if len(tok) != config["vocab_size"]:
        problems.append(f"len(tokenizer)={len(tok)} != vocab_size={config['vocab_size']}")
    text = "Expert parallelism: 128 experts, top-8 — ünïcödé ✓"
    ids = tok.encode(text, add_special_tokens=False)
    if tok.decode(ids) != text:
        problems.append(f"round trip changed {text!r} into {tok.decode(ids)!r}")
    print(f"AutoTokenizer: {type(tok).__name__}, {len(tok)} tokens, special ids {tok.all_special_ids}, "
          f"eos {tok.eos_token!r}; {len(text)} chars -> {len(ids)} ids")
    return problems


def check_random_dataset(model_dir: Path, input_len: int = 512) -> list[str]:
    from transformers import AutoTokenizer
    from vllm import __version__
    from vllm.benchmarks.datasets import RandomDataset

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    problems = []
    for seed, n in SEEDS.items():
        requests = RandomDataset(random_seed=seed).sample(tok, num_requests=n, input_len=input_len, output_len=128)
        lengths = collections.Counter(len(tok.encode(r.prompt, add_special_tokens=False)) for r in requests)
        declared = collections.Counter(r.prompt_len for r in requests)
        print(f"vllm {__version__} RandomDataset seed {seed}: {n} prompts, re-encoded lengths {dict(lengths)}, "
              f"declared {dict(declared)}")
        if set(lengths) != {input_len} or set(declared) != {input_len}:
            problems.append(f"seed {seed}: prompt lengths {dict(lengths)} (declared {dict(declared)}), "
                            f"wanted {input_len}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--random-dataset", action="store_true", help="also sample vLLM's random dataset (needs vllm)")
    args = ap.parse_args()
    problems = check_tokenizer(args.model_dir)
    if args.random_dataset:
        problems += check_random_dataset(args.model_dir)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
