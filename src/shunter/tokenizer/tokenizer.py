"""A model's tokenizer and chat template, as the gateway needs them in gRPC mode.

Loaded from a tokenizer directory (``tokenizer.json`` for Hugging Face ``tokenizers``, and
``tokenizer_config.json`` for the chat template and special tokens; a ``chat_template.jinja``
file or ``--chat-template`` overrides the template), whether that directory is on disk
(``--tokenizer-path``/``--model-path``) or was sent by the worker through ``GetTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer

from shunter.tokenizer.segments import SegmentEncoder


class TokenizerError(Exception):
    """The tokenizer files are missing or unreadable, or a chat template failed."""


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an object with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass
class ModelTokenizer:
    hf: HfTokenizer
    chat_template: str | None
    special_tokens: dict[str, str]  # bos_token, eos_token... for the template
    eos_ids: tuple[int, ...]
    _template: Template | None = field(default=None, repr=False)
    # Prompts encoded by segments, where the tokenizer allows it (segments.py).
    _segments: SegmentEncoder | None = field(default=None, repr=False)

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], chat_template: str | None = None
    ) -> ModelTokenizer:
        if "tokenizer.json" not in files:
            raise TokenizerError("no tokenizer.json among the tokenizer files")
        try:
            source = files["tokenizer.json"].decode()
            hf = HfTokenizer.from_str(source)
            config = json.loads(files.get("tokenizer_config.json", b"{}"))
            model = json.loads(source)
        except Exception as exc:  # tokenizers raises plain Exception for a bad file
            raise TokenizerError(f"unreadable tokenizer files: {exc}") from None
        if not isinstance(config, dict):
            config = {}
        template = chat_template or _template_of(config, files)
        specials = {
            key: text
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(key))) is not None
        }
        eos = specials.get("eos_token")
        eos_id = hf.token_to_id(eos) if eos else None

        def piece(text: str) -> list[int]:
            return list(hf.encode(text, add_special_tokens=False).ids)

        segments = SegmentEncoder.for_tokenizer(model, piece) if isinstance(model, dict) else None
        eos_ids = (eos_id,) if eos_id is not None else ()
        return cls(hf, template, specials, eos_ids, _segments=segments)

    @classmethod
    def from_directory(cls, path: str, chat_template: str | None = None) -> ModelTokenizer:
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer path {path} is not a directory")
        names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        files = {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}
        return cls.from_files(files, _read_template(chat_template))

    # --- encoding ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """A rendered prompt's ids, no special tokens added: by segments, each encoded once,
        where the tokenizer allows it (``segments.py``)."""
        if self._segments is not None:
            return self._segments.encode(text)
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for a chat, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise TokenizerError("the model's tokenizer has no chat template")
        variables: dict[str, Any] = {**self.special_tokens, **(extra or {})}
        variables.update(messages=messages, tools=tools, add_generation_prompt=True)
        try:
            return str(self._compiled_template().render(**variables))
        except TemplateError as exc:
            raise TokenizerError(f"the chat template failed: {exc}") from None

    def _compiled_template(self) -> Template:
        """Compiled once: compiling costs about a millisecond, rendering a few microseconds."""
        if self._template is None:
            assert self.chat_template is not None
            self._template = _environment().from_string(self.chat_template)
        return self._template


def _template_of(config: dict[str, Any], files: Mapping[str, bytes]) -> str | None:
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_template(value: str | None) -> str | None:
    """``--chat-template``: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


_ENV: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    """Templates come from model files: run them sandboxed, with HF's helpers."""
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        _ENV = env
    return _ENV
