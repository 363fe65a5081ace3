"""Long memory: a 100,000-message chat with planted facts, imported, then its context block.

Prints:
- the history bench's ingest rate (bench/history.py's messages and batches) with chat memory
  extraction off and on, in fresh stores, alternately;
- the import rate of a Telegram Desktop result.json of the chat (parse, check, write, index and
  extract, in one transaction), target >= 45,000 messages/s;
- the block build time on the bridge's path (``chat_memory.chat_block``, as
  ``Bridge._context_block`` calls it, in a warm process: the bridge is long-lived), target
  <= 20 ms (median; p95 shown);
- the share of planted facts in the 2,000-token block, target >= 95 %.

The chat is chatter (bench/context.py's lines, which carry no fact) with, every ``--fact-every``
messages, a planted fact of bench/context.py's kinds: a person's name, a ticket number, a file
path, a decision, a question. The last day holds the recent turns. A fact counts as present when
its key text (escaped as the block escapes it) is in the block, as written or condensed.

    .venv/bin/python bench/memory.py
    .venv/bin/python bench/memory.py --messages 100000 --fact-every 2500 --runs 200
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import percentile  # noqa: E402
from bench.context import CHATTER, chatter, planted_fact  # noqa: E402
from bench.history import ingest, synthetic_messages  # noqa: E402
from servers.core import chat_memory, tokens  # noqa: E402
from servers.core.context_markup import escape  # noqa: E402
from servers.core.context_opt.summaries import condense  # noqa: E402
from servers.core.history_import import import_file, read_messages  # noqa: E402
from servers.core.store import Store  # noqa: E402

CHAT_ID = 4_000_000_001
BLOCK_TOKENS = 2000
HISTORY_MESSAGES = 20  # the bridge's default VALOR_HOOK_HISTORY_MESSAGES


def export(count: int, fact_every: int, seed: int = 7) -> tuple[dict, list[str]]:
    """A Telegram Desktop single-chat export and the planted facts' keys."""
    rng = random.Random(seed)
    now = time.time()
    start = now - 365 * 86400
    step = (now - 86400 - start) / count  # spread over a year; the last 40 within the last day
    messages, keys = [], []
    for i in range(1, count + 1):
        sent = start + i * step if i <= count - 40 else now - (count - i + 1) * 60
        sender = ("Alice", "Bob", "Carol")[i % 3]
        if i % fact_every == fact_every // 2:  # none among the recent turns
            _kind, sentence, key = planted_fact(rng, len(keys))
            keys.append(key)
            text: object = f"{chatter(rng, 80)} {sentence[0].upper()}{sentence[1:]}."
            if len(keys) % 2:  # half as Telegram's entity segments
                text = [f"{chatter(rng, 40)} ", {"type": "bold", "text": sentence}, "."]
        else:
            text = rng.choice(CHATTER)
        messages.append(
            {
                "id": i,
                "type": "message",
                "date_unixtime": str(int(sent)),
                "from": sender,
                "from_id": f"user{100 + i % 3}",
                "text": text,
            }
        )
    return {"name": "bench", "type": "personal_chat", "id": CHAT_ID, "messages": messages}, keys


@contextmanager
def extraction_off():
    original = chat_memory.remember
    chat_memory.remember = lambda conn, rows: 0
    try:
        yield
    finally:
        chat_memory.remember = original


def history_rates(count: int, rounds: int) -> tuple[float, float]:
    """bench/history.py's ingest (its messages, its batches), extraction off and on, in turn."""
    messages, _words = synthetic_messages(count, 1)
    off, on = [], []
    for _ in range(rounds):
        for extracting, rates in ((False, off), (True, on)):
            with tempfile.TemporaryDirectory() as tmp:
                store = Store(Path(tmp) / "valor.db")
                if extracting:
                    rates.append(ingest(store, messages))
                else:
                    with extraction_off():
                        rates.append(ingest(store, messages))
                store.close()
    return statistics.median(off), statistics.median(on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--fact-every", type=int, default=2_500)
    parser.add_argument("--runs", type=int, default=200, help="block builds timed")
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds, off and on")
    args = parser.parse_args()
    tokens.count("warm up")

    off, on = history_rates(args.messages, args.rounds)
    print(f"history bench ingest, {args.messages:,} messages in one chat (median of {args.rounds})")
    print(f"  without chat memory: {off:,.0f} messages/s")
    print(f"  with chat memory:    {on:,.0f} messages/s ({100 * (on / off - 1):+.1f} %)")

    document, keys = export(args.messages, args.fact_every)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
        size = path.stat().st_size
        del document
        started = time.perf_counter()
        read_messages(path)
        parsing = time.perf_counter() - started
        for extracting in (False, True):  # extraction off first: the same file, a fresh store
            store = Store(Path(tmp) / f"valor-{extracting}.db")
            started, cpu = time.perf_counter(), time.process_time()
            if extracting:
                result = import_file(store, path)
            else:
                with extraction_off():
                    result = import_file(store, path)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            rate = result.messages / elapsed
            print(
                f"\nimport of result.json ({size / 1e6:.1f} MB, {result.messages:,} messages, "
                f"{len(keys)} planted facts), extraction {'on' if extracting else 'off'}: "
                f"{elapsed:.2f} s ({parsing:.2f} s of it reading and checking the file), "
                f"{rate:,.0f} messages/s; {result.messages / cpu:,.0f} messages per CPU second"
            )
        verdict = "met" if rate >= 45_000 else "NOT met"
        print(f"  target >= 45,000 messages/s with extraction: {verdict}")
        print(f"  chat memory: {result.memory_items:,} facts")
        again = import_file(store, path)
        print(f"  imported again: {again.added} added (idempotent)")

        conn = store.connection()
        last = args.messages

        def build() -> str:
            return chat_memory.chat_block(
                conn,
                CHAT_ID,
                "Alice",
                "100",
                max_messages=HISTORY_MESSAGES,
                max_tokens=BLOCK_TOKENS,
                exclude_message_id=last,
            )

        build()
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            block = build()
            times.append((time.perf_counter() - started) * 1000)
        median = statistics.median(times)
        print(
            f"\nblock build on the bridge's path ({args.runs} runs): median {median:.2f} ms, "
            f"p95 {percentile(times, 0.95):.2f} ms   (target <= 20 ms: "
            f"{'met' if median <= 20 else 'NOT met'})"
        )
        count = tokens.count(block)
        present = [key for key in keys if escape(key) in block or escape(condense(key)) in block]
        share = len(present) / len(keys)
        print(
            f"block: {count:,} tokens of {BLOCK_TOKENS:,}; planted facts present "
            f"{len(present)}/{len(keys)} = {100 * share:.1f} %   (target >= 95 %: "
            f"{'met' if share >= 0.95 else 'NOT met'})"
        )
        missing = [key for key in keys if key not in present]
        if missing:
            print("  missing:", "; ".join(missing[:5]))
        store.close()


if __name__ == "__main__":
    main()
