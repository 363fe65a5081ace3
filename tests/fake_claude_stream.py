"""tests/fake_claude.py's stand-in, also speaking the resident mode of warm sessions.

NOT Claude Code. With ``--input-format stream-json`` it reads one JSON line per message from
stdin and answers each as tests/fake_claude.py answers a prompt (``init``, the text, a
``result`` whose ``total_cost_usd`` is the session's running total, 0.001 a turn); an interrupt
control request is acknowledged (nothing is running between lines). Without the flag it is
tests/fake_claude.py. Used by the bridge bench's load part (bench/bridge.py).
"""

import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # fake_claude is a sibling script
import fake_claude
from fake_claude import answer, emit


def resident(session: str) -> None:
    total = 0.0
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("type") == "control_request":
            emit(
                {
                    "type": "control_response",
                    "response": {
                        "subtype": "success",
                        "request_id": message.get("request_id"),
                        "response": {},
                    },
                }
            )
            continue
        content = message["message"]["content"]
        prompt = content if isinstance(content, str) else json.dumps(content)
        total += 0.001
        answer(session, prompt, round(total, 6))


def main():
    args = sys.argv[1:]
    if "--input-format" not in args:
        fake_claude.main()
        return
    resident(args[args.index("--resume") + 1] if "--resume" in args else str(uuid.uuid4()))


if __name__ == "__main__":
    main()
