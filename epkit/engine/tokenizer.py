"""Tokenizers of the engine: epkit's own byte-level one, and a real checkpoint's ``tokenizer.json``.

epkit's models (bundled configs, folders written by :func:`write_model_dir`) use a byte-level
tokenizer built offline and saved as a standard ``tokenizer.json``: ids 0..255 are the 256 bytes
(GPT-2's ByteLevel alphabet, so one byte is one token); the config's ``bos_token_id``/``eos_token_id``
and ``<|im_start|>`` are special tokens; every other id below ``vocab_size`` is a reserved
``<|reserved_N|>`` token so that any id the model samples decodes to something.
``transformers.AutoTokenizer`` loads the folder that :func:`write_model_dir` writes.

Any other ``tokenizer.json`` (a real checkpoint's BPE with merges, byte-level or SentencePiece-style)
is served through the ``tokenizers`` library (:class:`HfTokenizer`): encoding, decoding with special
tokens skipped (vLLM's default) and incremental decoding as vLLM does it; its chat template comes from
``tokenizer_config.json`` (or ``chat_template.jinja``). :func:`load_tokenizer` picks one.
"""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from epkit.errors import EngineError
from epkit.topology.byte_level import byte_of

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
    alphabet = sorted(ByteLevel.alphabet(), key=byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(256, vocab_size):
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in sorted(specials.items())])
    return tok


def write_model_dir(config: dict[str, Any], directory: str | Path) -> Path:
    """Write ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.

    The folder is what clients such as ``vllm bench serve --tokenizer DIR`` or
    ``AutoTokenizer.from_pretrained(DIR)`` need; ``epkit serve DIR`` serves it too, reading the
    folder's ``*.safetensors`` (none there: pass ``--load-format dummy`` for random weights).
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
                self._bytes[i] = bytes([byte_of(text)])
            else:
                self._bytes[i] = text.encode()

    def describe(self) -> str:
        return f"epkit's byte-level tokenizer (one byte per token, {self.vocab_size} ids)"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # no post-processor: nothing to add

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes.get(token_id, b"")

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs): its bytes, a partial UTF-8 character as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self, prompt_ids: list[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        parts = [f"{IM_START}{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        return "".join(parts) + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class StreamDecoder:
    """Turns token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: ByteTokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int], final: bool = False) -> str:
        data = b"".join(self._tok.token_bytes(i) for i in ids)
        return self._utf8.decode(data, final=final)


class HfTokenizer:
    """A real checkpoint's ``tokenizer.json`` through the ``tokenizers`` library, used as vLLM uses it.

    Prompts of the completions API are encoded with the tokenizer's special tokens (its post-processor,
    e.g. a BOS), chat prompts without (the template has them); output text skips special tokens.
    ``vocab_size`` is the model's (its logits rows), which may exceed the tokenizer's own vocabulary.
    """

    def __init__(self, path: Path, vocab_size: int):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise EngineError(f"tokenizer {path} could not be read by the tokenizers library: {exc}") from exc
        self.path, self.vocab_size = path, vocab_size
        config_path = path.parent / "tokenizer_config.json"
        try:
            self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise EngineError(f"{config_path} is not valid JSON: {exc}") from exc
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = path.parent / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        self.chat_template: str | None = template
        self._template = None

    def describe(self) -> str:
        return f"{self.path} (tokenizers library, {self.tokenizer.get_vocab_size(with_added_tokens=True)} tokens)"

    def _special(self, key: str) -> str:
        value = self.config.get(key)
        return (value.get("content") if isinstance(value, dict) else value) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs), as vLLM shows it: special tokens included, a SentencePiece-style
        token's leading space restored (``▁the`` is `` the``)."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        raw = self.tokenizer.id_to_token(token_id) or ""
        if raw.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    def stream_decoder(self, prompt_ids: list[int] = ()) -> "HfStreamDecoder":
        return HfStreamDecoder(self, prompt_ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat prompt rendered by the tokenizer's Jinja template (as ``transformers`` renders it)."""
        from epkit.engine.protocol import ApiError

        if self.chat_template is None:
            raise ApiError(400, f"the tokenizer {self.path} has no chat template (tokenizer_config.json chat_template "
                                "or chat_template.jinja); use /v1/completions", "messages")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise ApiError(400, f"chat template: {message}", "messages")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # transformers gives templates it
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))


class HfStreamDecoder:
    """Incremental decoding as vLLM does it: decode a short window of ids before and after the new ones and
    emit the difference, holding text back while it ends in an incomplete character (U+FFFD).

    The window starts in the prompt, so a token's leading space (SentencePiece) decodes as in context."""

    CONTEXT = 5

    def __init__(self, tokenizer: HfTokenizer, prompt_ids: list[int] = ()):
        self._tok = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT - 1:])
        self.prefix, self.read = max(len(self.ids) - self.CONTEXT, 0), len(self.ids)

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        decode = self._tok.decode
        before = decode(self.ids[self.prefix : self.read])
        after = decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


def load_tokenizer(tokenizer: str | None, model_config: dict[str, Any], model_dir: Path | None):
    """The tokenizer to serve with: ``--tokenizer`` if given, else the model directory's ``tokenizer.json``.

    epkit's own byte-level tokenizer (bundled models, folders from :func:`write_model_dir`, or a model folder
    without a tokenizer.json) is :class:`ByteTokenizer`; any other ``tokenizer.json`` is :class:`HfTokenizer`.
    Raises :class:`EngineError` when ``--tokenizer`` names no tokenizer.json (epkit downloads nothing).
    """
    vocab_size = int(model_config["vocab_size"])
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise EngineError(f"tokenizer={tokenizer!r} is neither a tokenizer.json file nor a directory holding one "
                              "(epkit downloads nothing: pass a local path)")
    elif model_dir is not None and (model_dir / "tokenizer.json").is_file():
        file = model_dir / "tokenizer.json"
    else:
        return ByteTokenizer(model_config)
    if _is_byte_tokenizer(file, model_config):
        return ByteTokenizer(model_config)
    return HfTokenizer(file, vocab_size)


def _is_byte_tokenizer(file: Path, model_config: dict[str, Any]) -> bool:
    """Whether ``file`` is exactly the byte-level tokenizer :func:`build_tokenizer` makes for this config."""
    try:
        doc = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"tokenizer {file} is not valid JSON: {exc}") from exc
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return False  # a real BPE has merges
    try:
        return doc == json.loads(build_tokenizer(model_config).to_str())
    except EngineError:
        return False
