"""social-tools and notion-tools: start-up cost, SSRF-guard overhead, link search and save speed.

Prints, all measured in this one run:
- spawn-to-tools/list of social-tools and notion-tools over stdio beside telegram-tools
  (alternated), and which heavy SDKs a server import loads (should be none);
- a guarded fetch beside a plain httpx GET of the same loopback page (alternated), and the cost
  of vetting one URL alone;
- save_link end to end (fetch, trafilatura extraction, extractive summary, SQLite upsert);
- search_links latency over N saved links, scoped to one chat and across all chats.

    .venv/bin/python bench/social.py
    .venv/bin/python bench/social.py --links 50000 --starts 7 --fetches 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import compare_starts, heavy_modules_loaded, ms  # noqa: E402
from servers.core import http_guard, links  # noqa: E402
from servers.core.store import Store  # noqa: E402
from tests.social_fakes import FakePages, article  # noqa: E402

HEAVY = ("openai", "notion_client", "trafilatura", "httpx", "lxml", "tiktoken", "psutil")
WORDS = ["tracing", "billing", "rollout", "latency", "database", "kubernetes", "python"]
WORDS += ["rust", "release", "security", "audit", "design", "review", "migration", "cache"]
WORDS += ["queue", "worker", "payments", "search", "index", "growth", "mobile", "onboarding"]


async def bench_starts(starts: int, data_dir: str) -> None:
    await compare_starts(["servers.telegram", "servers.social", "servers.notion"], starts, data_dir)
    loaded = heavy_modules_loaded(["servers.social", "servers.notion"], HEAVY)
    print(f"  heavy SDKs loaded by importing both servers: {loaded}")


async def bench_guard(fetches: int, pages: FakePages) -> None:
    import httpx

    url = pages.html("post", article("Bench page", description="A page for the benchmark. " * 3))
    port = int(pages.url.rsplit(":", 1)[1])
    guarded, plain = [], []
    tls = http_guard._tls_context()
    with http_guard.allow_loopback_ports_for_tests(port):
        for _ in range(fetches):
            started = time.perf_counter()
            await http_guard.fetch(url)
            guarded.append(time.perf_counter() - started)
            # The same work without the guard: a new client and connection, shared TLS context.
            started = time.perf_counter()
            transport = httpx.AsyncHTTPTransport(verify=tls, retries=0)
            async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                response = await client.get(url)
                response.read()
            plain.append(time.perf_counter() - started)
        ports = http_guard.loopback_ports_allowed_for_tests()
        resolver = {"news.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}
        vet = []
        for _ in range(fetches * 10):
            started = time.perf_counter()
            http_guard.vet_url(
                "https://news.example/a/b?c=1", lambda h, p: resolver[h], loopback_ports=ports
            )
            vet.append(time.perf_counter() - started)
    ratio = statistics.median(guarded) / statistics.median(plain)
    print(f"\nfetch of one loopback page, {fetches} each, alternated:")
    print(f"  through the guard              {ms(guarded)}")
    print(f"  plain httpx, same setup        {ms(plain)}   guarded/plain x{ratio:.2f}")
    print(f"  vet_url alone (stub resolver)  median {statistics.median(vet) * 1e6:8.1f} µs")


async def bench_save(saves: int, pages: FakePages, store: Store) -> None:
    port = int(pages.url.rsplit(":", 1)[1])
    times = []
    with http_guard.allow_loopback_ports_for_tests(port):
        for i in range(saves):
            url = pages.html(f"save/{i}", article(f"Saved page {i}", body=" ".join(WORDS) * 5))
            started = time.perf_counter()
            await links.save_link(store, url, 1, use_model=False)
            times.append(time.perf_counter() - started)
    print(f"\nsave_link end to end (no model), {saves} pages: {ms(times)}")
    print(f"  first save (includes the trafilatura import) {times[0] * 1000:.1f} ms")


def bench_search(count: int, store: Store) -> None:
    rng = random.Random(7)
    started = time.perf_counter()
    with store.transaction() as conn:
        for i in range(count):
            words = rng.sample(WORDS, 8)
            conn.execute(
                "INSERT INTO links (url, final_url, chat_id, chat_key, title, summary, tags, "
                "summary_source, saved_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    f"https://site{i % 500}.example/post/{i}",
                    f"https://site{i % 500}.example/post/{i}",
                    i % 100,
                    f"c{i % 100}",
                    " ".join(words[:4]).title(),
                    " ".join(words * 3) + ".",
                    ", ".join(words[:3]),
                    "extractive",
                    time.time(),
                    time.time(),
                ),
            )
    elapsed = time.perf_counter() - started
    print(
        f"\nsearch_links over {count:,} links in 100 chats (inserted at {count / elapsed:,.0f}/s):"
    )
    for label, all_chats in (("one chat", False), ("all chats", True)):
        times = []
        for i in range(200):
            query = rng.choice(["tracing", "billing AND rust", '"design review"', "mig*"])
            started = time.perf_counter()
            links.search_links(store, query, i % 100, all_chats=all_chats, max_results=10)
            times.append(time.perf_counter() - started)
        print(f"  {label:9s} {ms(times)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--fetches", type=int, default=200)
    parser.add_argument("--saves", type=int, default=30)
    parser.add_argument("--links", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VALOR_DATA_DIR"] = tmp
        await bench_starts(args.starts, tmp)
        with FakePages() as pages:
            await bench_guard(args.fetches, pages)
            await bench_save(args.saves, pages, Store(Path(tmp) / "save.db"))
        bench_search(args.links, Store(Path(tmp) / "search.db"))


if __name__ == "__main__":
    asyncio.run(main())
