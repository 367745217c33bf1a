"""The gRPC sim's own tokenizer: a small byte-level BPE, trained at start-up in milliseconds.

A gRPC worker takes token ids, so the gateway tokenizes; the sim hands the gateway this
tokenizer through ``GetTokenizer`` (tokenizer.json plus a tokenizer_config.json with a
ChatML chat template, and the model's config.json), as an SGLang worker hands over its
model's. Byte-level BPE means a
multi-byte character can span tokens, which the gateway's incremental detokenizer must
handle; the training corpus makes sure some do.
"""

from __future__ import annotations

import io
import json
import zipfile
from functools import cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from shunter.sim.engine import WORDS

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added but not special, as in Qwen3's tokenizer: decoding keeps them, for the parsers.
TAG_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Words the BPE learns whole, plus text whose characters take two to four bytes, so that
# some merges stop inside a character.
_CORPUS = [
    " ".join(WORDS),
    "user system assistant tool hello world question answer the of and to in is it",
    "café naïve déjà vu — “quotes” 日本語のテキスト 你好世界 🙂🚀 Ελληνικά русский",
]


@cache
def sim_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False) for tag in TAG_TOKENS])
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    return {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
    }


def eos_token_ids() -> list[int]:
    token_id = sim_tokenizer().token_to_id(EOS_TOKEN)
    assert token_id is not None
    return [token_id]


def model_config() -> dict[str, object]:
    """The model's config.json, as ``GetModelInfo`` describes the model (a Llama)."""
    eos = eos_token_ids()[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": sim_tokenizer().get_vocab_size(),
        "max_position_embeddings": 32768,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }


def generation_config() -> dict[str, object]:
    return {"eos_token_id": eos_token_ids()}


def tokenizer_archive() -> bytes:
    """The model directory's tokenizer and config files, zipped, as ``GetTokenizer`` sends
    them: SGLang's servicer zips config.json and generation_config.json with the tokenizer
    files. smg reads the model's config from the archive; without it, it looked the model up
    on the Hugging Face hub on every chat request, and where there is no network one request
    in about 30 waited out a 5 s DNS timeout (12 req/s at 16 concurrent chats; 480 to 580 with
    the config here)."""
    files = {
        "tokenizer.json": sim_tokenizer().to_str(),
        "tokenizer_config.json": json.dumps(tokenizer_config()),
        "config.json": json.dumps(model_config()),
        "generation_config.json": json.dumps(generation_config()),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()
