"""The stdio front (servers.stdio_front) in front of a small demo server instead of the bundle.

    python tests/stdio_front_demo.py front [ok|fail]   # the real front; its child is this file
    python tests/stdio_front_demo.py serve             # the demo server the front starts
    python tests/stdio_front_demo.py fail              # a "bundle" that dies at start

The demo server has one tool that reports progress and logs while it runs, so a test can see
notifications pass through the front in both directions.
"""

import sys  # no `from __future__ import annotations`: FastMCP reads the tool's hints at runtime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAILURE_WORDS = "demo bundle: cannot import the tools"


def serve() -> None:
    from fastmcp import Context, FastMCP

    demo = FastMCP("demo-tools", instructions="A demo behind the front.")

    @demo.tool
    async def count_to(n: int, ctx: Context) -> str:
        """Count to n, reporting progress and logging each step."""
        for step in range(1, n + 1):
            await ctx.report_progress(step, n, f"step {step}")
            await ctx.info(f"counted {step}")
        return f"counted to {n}"

    demo.run(transport="stdio", show_banner=False)


def front(child: str) -> None:
    from servers import stdio_front

    stdio_front.bundle_command = lambda args: [sys.executable, __file__, child]
    stdio_front.main(["--demo", child])  # its own cache key: the arguments are part of it


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "front":
        front("serve" if sys.argv[2:] == ["ok"] else "fail")
    elif role == "serve":
        serve()
    else:
        sys.stderr.write(FAILURE_WORDS + "\n")
        sys.exit(3)
