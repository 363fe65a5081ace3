"""A stand-in for the `claude` binary that prints Claude Code's stream-json shapes instantly.

NOT Claude Code: used where the real CLI would only add seconds and nothing to check (the bridge's
own queueing under load, a crash mid-run, a malformed output line). The end-to-end tests use the
real CLI. Behaviour comes from the prompt (read from stdin, as the runner sends it):

- ``sleep:<seconds>`` anywhere: wait that long before answering (unless FAKE_CLAUDE_NO_SLEEP=1);
- ``malformed`` anywhere: print a line that is not JSON (and one unknown event) mid-stream;
- anything else: answer ``Echo: <the prompt's last line>``.

With FAKE_CLAUDE_PROMPTS_DIR set, the prompt is also written there as ``<pid>.txt`` once read, so
a test can wait until a run really has its prompt.
"""

import json
import os
import sys
import time
import uuid
from pathlib import Path


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def answer(session: str, prompt: str, total_cost_usd: float, *, malformed: bool = False) -> None:
    """One turn's stream-json: ``init``, the text, and a ``result`` carrying ``total_cost_usd``
    (tests/fake_claude_stream.py answers each resident turn with it too)."""
    emit(
        {
            "type": "system",
            "subtype": "init",
            "session_id": session,
            "model": "fake-claude",
            "tools": [],
            "mcp_servers": [],
        }
    )
    for word in prompt.split():
        if word.startswith("sleep:") and os.environ.get("FAKE_CLAUDE_NO_SLEEP") != "1":
            time.sleep(float(word.split(":", 1)[1]))
    if malformed:
        sys.stdout.write('{"type": "assistant", "message": {"content": [BROKEN\n')
        emit({"type": "stream_event", "event": {"type": "something_new"}})
    text = "Echo: " + (prompt.strip().splitlines() or [""])[-1]
    emit(
        {
            "type": "assistant",
            "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
            "session_id": session,
        }
    )
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "result": text,
            "session_id": session,
            "total_cost_usd": total_cost_usd,
            "num_turns": 1,
            "duration_ms": 1,
            "usage": {},
            "permission_denials": [],
        }
    )


def main():
    args = sys.argv[1:]
    session = args[args.index("--resume") + 1] if "--resume" in args else str(uuid.uuid4())
    prompt = sys.stdin.read()
    if prompts_dir := os.environ.get("FAKE_CLAUDE_PROMPTS_DIR"):
        Path(prompts_dir, f"{os.getpid()}.txt").write_text(prompt)
    answer(session, prompt, 0.001, malformed="malformed" in prompt)


if __name__ == "__main__":
    main()
