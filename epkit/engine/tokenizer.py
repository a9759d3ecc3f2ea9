"""Byte-level tokenizer built offline, saved as a standard ``tokenizer.json``.

Ids 0..255 are the 256 bytes (GPT-2's ByteLevel alphabet, so one byte is one token);
the config's ``bos_token_id``/``eos_token_id`` and ``<|im_start|>`` are special tokens;
every other id below ``vocab_size`` is a reserved ``<|reserved_N|>`` token so that any id
the model samples decodes to something. ``transformers.AutoTokenizer`` loads the folder
that :func:`write_model_dir` writes.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from epkit.errors import EngineError

IM_START = "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def special_tokens(config: dict[str, Any]) -> dict[int, str]:
    """Id -> text of the special tokens for a model config (bos, eos, ``<|im_start|>``)."""
    vocab = int(config["vocab_size"])
    bos = int(config.get("bos_token_id") if config.get("bos_token_id") is not None else 256)
    eos = config.get("eos_token_id")
    eos = int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 257))
    if vocab < 259:
        raise EngineError(f"vocab_size={vocab} is too small for a byte-level tokenizer; needs >= 259")
    specials = {bos: "<|endoftext|>", eos: "<|im_end|>"}
    im_start = next(i for i in range(256, vocab) if i not in specials)
    specials[im_start] = IM_START
    for token_id in specials:
        if not 256 <= token_id < vocab:
            raise EngineError(f"special token id {token_id} must lie in 256..vocab_size-1={vocab - 1}")
    return specials


def build_tokenizer(config: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` for the config: byte tokens, reserved ids, special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab_size = int(config["vocab_size"])
    specials = special_tokens(config)
    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(256, vocab_size):
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in sorted(specials.items())])
    return tok


_BYTE_OF: dict[str, int] = {}


def _byte_of(ch: str) -> int:
    if not _BYTE_OF:
        # GPT-2's bytes_to_unicode, inverted.
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_OF.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_OF[ch]


def write_model_dir(config: dict[str, Any], directory: str | Path) -> Path:
    """Write ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.

    The folder is what clients such as ``vllm bench serve --tokenizer DIR`` or
    ``AutoTokenizer.from_pretrained(DIR)`` need; ``epkit serve DIR`` serves it too
    (random weights unless the folder also holds ``*.safetensors``).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(config)
    by_text = {text: i for i, text in specials.items()}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer(config).save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": int(config.get("max_position_embeddings") or 4096),
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    gen = {"bos_token_id": by_text["<|endoftext|>"], "eos_token_id": by_text["<|im_end|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out


class ByteTokenizer:
    """Encode with the ``tokenizers`` object; decode incrementally from a byte table.

    Decoding goes through a per-id byte table and an incremental UTF-8 decoder, so a
    multi-byte character split across tokens streams out once it is complete.
    """

    def __init__(self, config: dict[str, Any], model_dir: Path | None = None):
        from tokenizers import Tokenizer

        path = model_dir / "tokenizer.json" if model_dir is not None else None
        self.tokenizer = Tokenizer.from_file(str(path)) if path is not None and path.is_file() else build_tokenizer(config)
        self.vocab_size = int(config["vocab_size"])
        specials = special_tokens(config)
        self.eos_token_id = next(i for i, t in specials.items() if t == "<|im_end|>")
        self._bytes: dict[int, bytes] = {}
        for text, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if i < 256:
                self._bytes[i] = bytes([_byte_of(text)])
            else:
                self._bytes[i] = text.encode()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes.get(token_id, b"")

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        parts = [f"{IM_START}{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        return "".join(parts) + f"{IM_START}assistant\n"


class StreamDecoder:
    """Turns token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: ByteTokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int], final: bool = False) -> str:
        data = b"".join(self._tok.token_bytes(i) for i in ids)
        return self._utf8.decode(data, final=final)
