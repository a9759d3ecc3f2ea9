"""A small real checkpoint built in the tests: a byte-level BPE tokenizer.json trained with the `tokenizers`
library, a Qwen3-MoE config.json and model.safetensors, and the engine's own forward pass as the reference.

The weights make greedy decoding follow a known text: the embedding rows are random, the LM-head row of each
token of ``CHAIN_TEXT`` is ALPHA/H times the embedding of the token before it, and every attention and MoE
layer is scaled down (their outputs are ~10 % of the residual). So the residual stays close to the current
token's embedding and the next token of the text wins by several logits, yet every layer still adds to the
logits the logprobs are checked against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAIN_TEXT = "the cat sat on a mat, naïve café über 日本語"
PROMPT_TEXT = "the cat"  # a word-boundary prefix of CHAIN_TEXT: its tokens are the chain's first ones
CORPUS = ["the cat sat on the mat", "a dog, a cat and a mat", "naïve café über alles", "日本語のテキスト",
          "über naïve cafés", "the end"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
VOCAB = 512  # the model's vocabulary (logit rows): larger than the tokenizer's, as real checkpoints pad it
ALPHA = 16.0
CONFIG = {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
          "moe_intermediate_size": 32, "norm_topk_prob": True, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}


def train_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with merges, trained on a small corpus (as GPT-2/Qwen's are)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_model(directory: Path) -> dict:
    """Write tokenizer.json, tokenizer_config.json, config.json and model.safetensors; returns facts for the tests."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
         "chat_template": CHAT_TEMPLATE}))
    eos, bos = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    config = {**CONFIG, "eos_token_id": eos, "bos_token_id": bos}
    (directory / "config.json").write_text(json.dumps(config))
    chain = tok.encode(CHAIN_TEXT).ids
    prompt = tok.encode(PROMPT_TEXT).ids
    assert len(set(chain)) == len(chain) and chain[: len(prompt)] == prompt, "the chain text must have distinct tokens"
    assert tok.get_vocab_size() <= VOCAB
    save_file(_tensors(config, chain + [eos], seed=11), directory / "model.safetensors")
    return {"tokenizer": tok, "config": config, "chain": chain, "prompt": prompt, "eos": eos}


def _tensors(config: dict, chain: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors in Hugging Face names and (out, in) layouts."""
    g = torch.Generator().manual_seed(seed)
    h, d, layers = config["hidden_size"], config["head_dim"], config["num_hidden_layers"]
    nq, nkv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    experts, inter = config["num_experts"], config["moe_intermediate_size"]

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std).contiguous()

    embed = rnd(VOCAB, h, std=1.0)
    lm_head = rnd(VOCAB, h, std=0.02)
    for before, after in zip(chain, chain[1:]):
        lm_head[after] = embed[before] * (ALPHA / h)
    t = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head, "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
        t[p + "self_attn.q_proj.weight"] = rnd(nq, h, std=h ** -0.5)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv, h, std=h ** -0.5)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv, h, std=h ** -0.5)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nq, std=0.1 * nq ** -0.5)
        t[p + "self_attn.q_norm.weight"] = torch.ones(d)
        t[p + "self_attn.k_norm.weight"] = torch.ones(d)
        t[p + "mlp.gate.weight"] = rnd(experts, h, std=h ** -0.5)
        for e in range(experts):
            t[f"{p}mlp.experts.{e}.gate_proj.weight"] = rnd(inter, h, std=h ** -0.5)
            t[f"{p}mlp.experts.{e}.up_proj.weight"] = rnd(inter, h, std=h ** -0.5)
            t[f"{p}mlp.experts.{e}.down_proj.weight"] = rnd(h, inter, std=0.1 * inter ** -0.5)
    return t


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits ``[len(ids), vocab]`` of one whole-sequence forward pass, in float32, with the
    engine's own model code over the same checkpoint: row ``i`` scores token ``i + 1``."""
    from epkit.engine.attention import build_meta
    from epkit.engine.model import ModelConfig, MoEModel, Weights, read_model_config
    from epkit.engine.moe import ExpertRanges, ReplicatedMoE, StaticExpertMap

    cpu = torch.device("cpu")
    config, _ = read_model_config(str(model_dir))
    mcfg = ModelConfig.from_dict(config)
    placement = ExpertRanges(mcfg.num_experts, 1, 0)
    weights = Weights(mcfg, placement, 0, cpu, torch.float32, model_dir)
    expert_map = StaticExpertMap(placement, cpu)
    for layer in weights.layers:
        if "experts" in layer:
            layer["experts"].map = expert_map
    model = MoEModel(mcfg, weights, ReplicatedMoE(), mcfg.max_position_embeddings, cpu)
    block, n = 16, len(ids)
    blocks = -(-n // block)
    meta = build_meta([(0, n, list(range(blocks)))], block, cpu, False)
    shape = (blocks * block, mcfg.num_kv_heads, mcfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(mcfg.num_layers)]
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(ids), torch.arange(n), meta, caches, [n])
        return torch.log_softmax(model.logits(hidden).float(), dim=-1)
