"""Conversation history at scale, and the telegram-tools stdio cold start.

Prints: ingest rate (messages/s) and search latency p50/p95 on synthetic messages across chats;
then spawn-to-tools/list time of the telegram-tools server beside a bare FastMCP hello-world
server, measured alternately in the same run.

    .venv/bin/python bench/history.py                 # 1,000,000 messages, 1,000 chats
    .venv/bin/python bench/history.py --messages 100000 --chats 100 --starts 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import percentile, spawn_to_tools_list  # noqa: E402
from servers.core.history import Message, record_messages, search_history  # noqa: E402
from servers.core.store import Store  # noqa: E402

HELLO_SERVER = """
from fastmcp import FastMCP
mcp = FastMCP("hello")

@mcp.tool
def hello(name: str) -> str:
    return f"hello {name}"

mcp.run(show_banner=False)
"""


def vocabulary(size: int, rng: random.Random) -> list[str]:
    syllables = ["ka", "lo", "mi", "ru", "ten", "sa", "vo", "di", "pe", "zu", "ar", "ne", "qui"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def synthetic_messages(count: int, chats: int, seed: int = 7) -> tuple[list[Message], list[str]]:
    """Messages spread round-robin over chats, and the vocabulary, most frequent words first."""
    rng = random.Random(seed)
    words = vocabulary(20_000, rng)
    # Zipf-like: a few words are everywhere, most are rare, as in real chat.
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    start = time.time() - 365 * 86400
    messages = [
        Message(
            chat_id=i % chats,
            message_id=i // chats,
            text=" ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(6, 24))),
            sender=f"user{rng.randint(0, 50)}",
            sender_id=rng.randint(1, 10_000),
            direction="in" if i % 3 else "out",
            sent_at=start + i * 30,
        )
        for i in range(count)
    ]
    return messages, words


def ingest(store: Store, messages: list[Message], batch: int = 20_000) -> float:
    """Messages per second through record_messages, in batches as the bridge's catch-up does."""
    started = time.perf_counter()
    for offset in range(0, len(messages), batch):
        record_messages(store, messages[offset : offset + batch])
    return len(messages) / (time.perf_counter() - started)


def search_latency(store: Store, words: list[str], chats: int, queries: int = 1000):
    rng = random.Random(11)
    common, rare = words[:200], words[200:5000]
    kinds = {
        "common word": lambda: rng.choice(common),
        "rare word": lambda: rng.choice(rare),
        "two words": lambda: f"{rng.choice(common)} {rng.choice(rare)}",
        "phrase": lambda: f'"{rng.choice(common)} {rng.choice(common)}"',
        "prefix*": lambda: rng.choice(rare)[:4] + "*",
    }
    timings: dict[str, list[float]] = {kind: [] for kind in kinds}
    names = list(kinds)
    for i in range(queries):
        kind = names[i % len(names)]
        query = kinds[kind]()
        chat = rng.randrange(chats)
        started = time.perf_counter()
        search_history(store, query, chat, 10)
        timings[kind].append((time.perf_counter() - started) * 1000)
    return timings


def cold_starts(starts: int, data_dir: str) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        hello = Path(tmp) / "hello_server.py"
        hello.write_text(HELLO_SERVER)
        bare, valor = [], []
        for _ in range(starts):  # alternate so machine noise hits both alike
            bare.append(asyncio.run(spawn_to_tools_list([str(hello)], data_dir)))
            valor.append(asyncio.run(spawn_to_tools_list(["-m", "servers.telegram"], data_dir)))
        return bare, valor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--chats", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "valor.db")
        messages, words = synthetic_messages(args.messages, args.chats)
        rate = ingest(store, messages)
        del messages
        print(f"messages: {args.messages:,} across {args.chats:,} chats")
        print(f"ingest: {rate:,.0f} messages/s   (target >= 50,000)")
        by_kind = search_latency(store, words, args.chats, args.queries)
        timings = [t for values in by_kind.values() for t in values]
        for kind, values in by_kind.items():
            print(
                f"  {kind:12} p50 {percentile(values, 0.5):6.2f} ms  "
                f"p95 {percentile(values, 0.95):6.2f} ms"
            )
        print(
            f"search ({args.queries} queries, 10 hits each): "
            f"p50 {percentile(timings, 0.5):.2f} ms  p95 {percentile(timings, 0.95):.2f} ms  "
            f"max {max(timings):.2f} ms   (targets p50 <= 5 ms, p95 <= 20 ms)"
        )
        print(f"database size: {store.size_bytes() / 1e6:,.0f} MB")
        store.close()

        bare, valor = cold_starts(args.starts, tmp)
    bare_median, valor_median = statistics.median(bare), statistics.median(valor)
    print(
        f"stdio cold start, spawn to tools/list, median of {args.starts}: "
        f"bare FastMCP {bare_median * 1000:.0f} ms, telegram-tools {valor_median * 1000:.0f} ms, "
        f"ratio {valor_median / bare_median:.3f}   (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
