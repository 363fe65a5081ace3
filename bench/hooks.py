"""Wall time of the Claude Code hook commands, beside `python -c pass`, measured in one run.

    .venv/bin/python bench/hooks.py [--runs 30]

Each command runs the way Claude Code runs it (through `sh -c`, from the repo root, JSON on
stdin), against a throwaway store seeded with a realistic chat history. Runs are interleaved
round-robin so that every command sees the same machine load. Targets: UserPromptSubmit
<= 150 ms, PostToolUse <= 100 ms (median).

While Claude Code runs, some Valor process (the bridge, the daemon or the server whose tool just
ran) has the store open, so the main runs hold a connection too. The last line measures
PostToolUse with nobody else on the store: SQLite then checkpoints the WAL when the hook closes.

Bridge prompts are measured twice: a short history whose block fits the token budget by its
byte count alone, and a long one where context-tools' optimizer needs the tokenizer (tiktoken
loads in the hook process).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PYTHON = ".venv/bin/python"
CHAT, SHORT_CHAT = 4242, 4343
# The bridge builds the block in its own process and hands it over (VALOR_CONTEXT_BLOCK_FILE):
# that is the path every bridge prompt takes. The other two rows are the hook's fallback, when a
# launcher gives it only the chat and it must build the block itself.
BRIDGE_PREBUILT = "UserPromptSubmit (bridge: block built by the bridge)"
BRIDGE_SHORT = "UserPromptSubmit (fallback: hook builds a short block)"
BRIDGE_LONG = "UserPromptSubmit (fallback: hook builds a long block)"
INTERACTIVE, POST_TOOL_USE = "UserPromptSubmit (interactive)", "PostToolUse"
TARGETS_MS = {BRIDGE_SHORT: 150, BRIDGE_LONG: 150, BRIDGE_PREBUILT: 150, INTERACTIVE: 150}
TARGETS_MS[POST_TOOL_USE] = 100


def seed(data_dir: Path) -> None:
    from servers.core import history
    from servers.core.history import Message
    from servers.core.store import Store

    store = Store(data_dir / "valor.db")
    now = time.time()
    words = ["deploy", "billing", "staging", "logs", "error", "retry", "review", "merge"]
    long_chat = [
        Message(
            CHAT if i % 3 else CHAT + 1,
            i,
            " ".join(words[(i + k) % len(words)] for k in range(40)),
            "alice" if i % 2 else "Valor",
            11 if i % 2 else None,
            "in" if i % 2 else "out",
            now - 3600 + i,
        )
        for i in range(1, 3001)
    ]
    short_chat = [
        Message(SHORT_CHAT, i, f"ok, step {i} done", "bob", 12, "in", now - 600 + i)
        for i in range(1, 11)
    ]
    history.record_messages(store, long_chat + short_chat)
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO tool_calls (server, tool, success, duration_ms, called_at) "
            "VALUES ('telegram-tools', 'search_conversation_history', 1, 12, ?)",
            [(now - i,) for i in range(5000)],
        )
    # What a launcher would write with VALOR_CONTEXT_BLOCK_FILE: the same block, built once.
    from servers.core.context_opt import build_context_block

    rows = [
        {"sender": m.sender, "direction": m.direction, "text": m.text, "sent_at": m.sent_at}
        for m in long_chat
        if m.chat_id == CHAT
    ][-20:]
    block = build_context_block(CHAT, "alice", 11, rows, 2000)
    (data_dir / "block.txt").write_text(block, encoding="utf-8")
    store.close()


def commands(data_dir: Path) -> dict[str, tuple[str, str, dict[str, str]]]:
    """name -> (shell command, stdin, extra environment)."""
    base = {"VALOR_DATA_DIR": str(data_dir)}

    def bridge(chat: int) -> dict[str, str]:
        return {
            **base,
            "VALOR_LAUNCHED_BY": "bridge",
            "VALOR_CHAT_ID": str(chat),
            "VALOR_USER_ID": "11",
            "VALOR_USER_NAME": "alice",
        }

    prompt = json.dumps({"session_id": "bench", "prompt": "status?", "cwd": str(REPO_ROOT)})
    tool = json.dumps(
        {
            "session_id": "bench",
            "tool_name": "mcp__monitoring-tools__system_health",
            "tool_input": {},
            "tool_response": [{"type": "text", "text": "{}"}],
            "duration_ms": 12,
        }
    )
    hook = f"cd {REPO_ROOT} && {PYTHON} -m servers.hooks"
    return {
        "python -c pass": (f"cd {REPO_ROOT} && {PYTHON} -c pass", "", base),
        BRIDGE_SHORT: (f"{hook} user-prompt-submit", prompt, bridge(SHORT_CHAT)),
        BRIDGE_LONG: (f"{hook} user-prompt-submit", prompt, bridge(CHAT)),
        BRIDGE_PREBUILT: (
            f"{hook} user-prompt-submit",
            prompt,
            {**bridge(CHAT), "VALOR_CONTEXT_BLOCK_FILE": str(data_dir / "block.txt")},
        ),
        INTERACTIVE: (f"{hook} user-prompt-submit", prompt, base),
        POST_TOOL_USE: (f"{hook} post-tool-use", tool, base),
        "SessionStart": (f"{hook} session-start", prompt, base),
    }


def measure(plan: dict, names: list[str], runs: int, env: dict[str, str]) -> dict[str, list]:
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            command, stdin, extra = plan[name]
            started = time.perf_counter()
            completed = subprocess.run(
                command,
                shell=True,
                input=stdin,
                text=True,
                env={**env, **extra},
                capture_output=True,
                check=True,
            )
            times[name].append((time.perf_counter() - started) * 1000)
            if name.startswith("UserPromptSubmit") and "additionalContext" not in completed.stdout:
                raise SystemExit(f"{name} added no context: {completed.stdout[:200]!r}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        seed(data_dir)
        plan = commands(data_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VALOR_")}
        names = list(plan)
        measure(plan, names, 1, env)  # warm the page cache
        holder = sqlite3.connect(data_dir / "valor.db")  # a Valor process has the store open
        holder.execute("SELECT count(*) FROM tool_calls").fetchone()
        times = measure(plan, names, args.runs, env)
        holder.close()
        alone = measure(plan, ["python -c pass", POST_TOOL_USE], args.runs, env)
        times["PostToolUse (store otherwise closed)"] = alone[POST_TOOL_USE]
        baseline_alone = statistics.median(alone["python -c pass"])
        log = data_dir / "logs" / "hooks.log"
        if log.exists():
            raise SystemExit(f"a hook failed during the bench:\n{log.read_text()}")

    baseline = statistics.median(times["python -c pass"])
    print(f"hook commands, {args.runs} interleaved runs each (sh -c, from the repo root)")
    print(f"{'command':54} {'median ms':>10} {'p90 ms':>8} {'x python':>9} {'target':>12}")
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        base = baseline_alone if "otherwise closed" in name else baseline
        target = TARGETS_MS.get(name)
        verdict = (
            "" if target is None else f"<= {target} " + ("ok" if median <= target else "MISSED")
        )
        print(f"{name:54} {median:10.1f} {p90:8.1f} {median / base:9.2f} {verdict:>12}")


if __name__ == "__main__":
    main()
