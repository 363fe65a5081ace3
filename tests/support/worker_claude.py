"""The `claude` a test's remote workers run: tests/fake_claude.py, or the real Claude Code CLI
(``WORKER_REAL_CLAUDE``) for a prompt that contains ``use-the-real-cli``.

One worker configuration then serves both the fast promises (where the CLI adds nothing) and the
one run that must be the real CLI. The prompt arrives on stdin; it is handed on unchanged.
"""

import os
import sys
from pathlib import Path

FAKE_CLAUDE = Path(__file__).resolve().parents[1] / "fake_claude.py"


def main() -> None:
    prompt = sys.stdin.buffer.read()
    real = os.environ.get("WORKER_REAL_CLAUDE")
    if real and b"use-the-real-cli" in prompt:
        argv = [real, *sys.argv[1:]]
    else:
        argv = [sys.executable, str(FAKE_CLAUDE), *sys.argv[1:]]
    read_end, write_end = os.pipe()
    os.write(write_end, prompt)  # prompts here are far below a pipe's buffer
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
