"""development-tools: start-up cost, screenshot lookup speed, and a real browser capture.

Prints, all measured in this one run:
- spawn-to-tools/list of development-tools over stdio beside telegram-tools (alternated), and
  which heavy modules importing the server loads (should be none: openai, playwright, psutil …);
- newest-screenshot lookup and listing over a screenshots folder of TASKS × FILES images, beside
  a bare os.scandir of one task folder (the floor);
- Playwright + the system Chromium capturing a loopback page (launch, load, screenshot, atomic
  write), when Chromium and Playwright are installed.

    .venv/bin/python bench/development.py
    .venv/bin/python bench/development.py --tasks 500 --files 40 --starts 7 --captures 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import compare_starts, heavy_modules_loaded, ms  # noqa: E402
from servers.core import screenshots  # noqa: E402

HEAVY = ("openai", "playwright", "psutil", "anthropic", "notion_client", "httpx", "tiktoken")


async def bench_starts(starts: int, data_dir: str) -> None:
    await compare_starts(["servers.telegram", "servers.development"], starts, data_dir)
    loaded = heavy_modules_loaded(["servers.development"], HEAVY)
    print(f"  heavy modules loaded by importing servers.development: {loaded}")


def bench_lookup(base: Path, tasks: int, files: int, rounds: int) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    now = time.time()
    for t in range(tasks):
        folder = base / f"task-{t:05d}"
        folder.mkdir(parents=True)
        for f in range(files):
            path = folder / f"{f:04d}-shot.png"
            path.write_bytes(png)
            moment = now - (t * files + f)
            os.utime(path, (moment, moment))
    probe = f"task-{tasks // 2:05d}"
    newest, listing_one, listing_all, floor = [], [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        list(os.scandir(base / probe))
        floor.append(time.perf_counter() - started)
        started = time.perf_counter()
        screenshots.newest_screenshot(base, probe, max_age_minutes=10**9)
        newest.append(time.perf_counter() - started)
        started = time.perf_counter()
        screenshots.list_screenshots(base, probe, limit=50)
        listing_one.append(time.perf_counter() - started)
        started = time.perf_counter()
        screenshots.list_screenshots(base, None, limit=50)
        listing_all.append(time.perf_counter() - started)
    ratio = statistics.median(newest) / statistics.median(floor)
    print(
        f"screenshot lookup, {tasks} tasks x {files} files = {tasks * files} images, "
        f"{rounds} rounds:"
    )
    print(f"  os.scandir of one task (floor) {ms(floor)}")
    print(f"  newest_screenshot(task)        {ms(newest)}   x{ratio:.1f} of the floor")
    print(f"  list_screenshots(task)         {ms(listing_one)}")
    print(f"  list_screenshots(every task)   {ms(listing_all)}")


def bench_capture(base: Path, captures: int) -> None:
    from servers.core import browser_capture

    try:
        import playwright  # noqa: F401
    except ImportError:
        print("browser capture: skipped (pip install -e '.[browser]')")
        return
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        print("browser capture: skipped (apt-get install chromium)")
        return
    page = b"<!doctype html><body style='background:#036'><h1>bench</h1></body>"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    times, sizes = [], []
    try:
        for _ in range(captures):
            started = time.perf_counter()
            path = browser_capture.capture(url, base / "bench-capture", label="bench")
            times.append(time.perf_counter() - started)
            sizes.append(path.stat().st_size)
    finally:
        server.shutdown()
        server.server_close()
    print(f"browser capture (Playwright + system Chromium, 1280x800), {captures} captures:")
    print(
        f"  capture end to end             {ms(times)}   "
        f"median PNG {statistics.median(sizes):,.0f} B"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--captures", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VALOR_DATA_DIR"] = tmp
        asyncio.run(bench_starts(args.starts, tmp))
        bench_lookup(Path(tmp) / "screenshots", args.tasks, args.files, args.rounds)
        bench_capture(Path(tmp) / "screenshots", args.captures)


if __name__ == "__main__":
    main()
