"""The stdio front (servers.stdio_front): cached listings, an unchanged relay, no orphans."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest

from servers import stdio_front
from servers.core.settings import REPO_ROOT
from tests.stdio_front_demo import FAILURE_WORDS
from tests.support import INITIALIZE_REQUEST, wait_until

PYTHON = sys.executable
DEMO = str(Path(__file__).with_name("stdio_front_demo.py"))
BUNDLE_ARGS = ["--directory", str(REPO_ROOT)]


def base_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"],
        **extra,
    }


def cache_files() -> list[Path]:
    folder = Path(os.environ["VALOR_DATA_DIR"]) / stdio_front.CACHE_FOLDER
    return sorted(folder.glob("*.json")) if folder.exists() else []


@asynccontextmanager
async def session_with(args: list[str], env: dict[str, str], cwd: Path):
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=PYTHON, args=args, env=env, cwd=str(cwd))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        yield session


async def listings(args: list[str], env: dict[str, str], cwd: Path) -> tuple[dict, dict, bool]:
    """initialize and tools/list through the official client; and whether, by the time both
    were answered, the server had started a child (the bundle, behind a front)."""
    async with session_with(args, env, cwd) as session:
        initialized = await session.initialize()
        tools = await session.list_tools()
        me = psutil.Process()
        children = [
            p for p in me.children(recursive=True) if "servers.bundle" in " ".join(p.cmdline())
        ]
        started_child = any(p.parent() and p.parent().pid != me.pid for p in children)
    return initialized.model_dump(), tools.model_dump(), started_child


def tool_names(listing: dict) -> set[str]:
    return {tool["name"] for tool in listing["tools"]}


# -- the listings: the bundle's own, from the cache ---------------------------------------------
async def test_cold_then_warm_listings_equal_the_bundles_and_the_warm_ones_need_no_bundle(
    tmp_path,
):
    direct = await listings(["-m", "servers.bundle", *BUNDLE_ARGS], base_env(), tmp_path)
    front_args = ["-m", "servers.stdio_front", *BUNDLE_ARGS]
    lazy = base_env(VALOR_STDIO_FRONT_START="lazy")  # the bundle starts only when needed
    cold = await listings(front_args, lazy, tmp_path)
    [cache] = cache_files()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    warm = await listings(front_args, lazy, tmp_path)
    assert cold[:2] == direct[:2] and warm[:2] == direct[:2]
    assert cold[2] is True  # a miss: the bundle answered
    assert warm[2] is False  # a hit: answered before any bundle existed
    assert "list_promises" in tool_names(direct[1])


async def test_the_modern_discover_flow_is_cached_too(tmp_path):
    async def discover_and_list() -> tuple[dict, dict]:
        args = ["-m", "servers.stdio_front", *BUNDLE_ARGS]
        async with session_with(args, base_env(), tmp_path) as session:
            discovered = await session.discover()
            tools = await session.list_tools()
        return discovered.model_dump(), tools.model_dump()

    cold = await discover_and_list()
    warm = await discover_and_list()
    assert cold == warm
    answers = json.loads(cache_files()[0].read_text())["answers"]
    assert any(json.loads(slot)[0] == "server/discover" for slot in answers)


async def test_a_chat_principal_misses_the_operators_cache(tmp_path):
    front_args = ["-m", "servers.stdio_front", *BUNDLE_ARGS]
    operator = await listings(front_args, base_env(), tmp_path)
    chat_env = base_env(VALOR_CHAT_ID="42", VALOR_STDIO_FRONT_START="lazy")
    chat = await listings(front_args, chat_env, tmp_path)
    direct_chat = await listings(["-m", "servers.bundle", *BUNDLE_ARGS], chat_env, tmp_path)
    assert chat[2] is True  # not served from the operator's entry
    assert chat[1] == direct_chat[1]
    assert tool_names(chat[1]) < tool_names(operator[1])  # operator-only tools are not listed
    assert len(cache_files()) == 2


def test_a_source_change_changes_the_key(tmp_path, monkeypatch):
    sources = tmp_path / "servers"
    shutil.copytree(stdio_front.SERVERS_DIR, sources, ignore=shutil.ignore_patterns("__pycache__"))
    before = stdio_front.source_digest(str(sources))
    assert stdio_front.source_digest(str(sources)) == before
    (sources / "telegram.py").write_text((sources / "telegram.py").read_text() + "\n# changed\n")
    assert stdio_front.source_digest(str(sources)) != before

    key = stdio_front.cache_key(BUNDLE_ARGS)
    folder = tmp_path / "cache"
    stdio_front.AnswerCache(str(folder), key).put("slot", {"tools": []})
    assert stdio_front.AnswerCache(str(folder), key).get("slot") == {"tools": []}
    monkeypatch.setattr(stdio_front, "source_digest", lambda root=None: "another tree")
    changed = stdio_front.cache_key(BUNDLE_ARGS)
    assert changed != key
    assert stdio_front.AnswerCache(str(folder), changed).get("slot") is None
    assert stdio_front.cache_key(["--only", "social-tools", *BUNDLE_ARGS]) != changed


def test_a_corrupt_foreign_or_loose_cache_file_is_ignored(tmp_path, capsys):
    folder = tmp_path / "cache"
    cache = stdio_front.AnswerCache(str(folder), "k1")
    cache.put("slot", {"tools": []})
    path = Path(cache.path)
    assert stdio_front.AnswerCache(str(folder), "k1").answers == {"slot": {"tools": []}}

    path.write_text('{"format": 1, "key": "k1", "answers": {"slot": {"too')  # cut short
    assert stdio_front.AnswerCache(str(folder), "k1").answers == {}
    foreign = {"format": 1, "key": "someone else", "answers": {"slot": {"tools": []}}}
    path.write_text(json.dumps(foreign))  # planted under this key's name
    assert stdio_front.AnswerCache(str(folder), "k1").answers == {}
    path.write_text(json.dumps({**foreign, "key": "k1"}))
    path.chmod(0o666)  # anyone could have written it
    assert stdio_front.AnswerCache(str(folder), "k1").answers == {}
    path.chmod(0o600)
    assert stdio_front.AnswerCache(str(folder), "k1").answers == {"slot": {"tools": []}}
    assert "ignoring" in capsys.readouterr().err


async def test_a_corrupt_cache_file_is_replaced_by_the_bundles_answers(tmp_path):
    args = ["-m", "servers.stdio_front", *BUNDLE_ARGS]
    first = await listings(args, base_env(), tmp_path)
    [cache] = cache_files()
    cache.write_text("not json at all")
    lazy = base_env(VALOR_STDIO_FRONT_START="lazy")
    again = await listings(args, lazy, tmp_path)
    assert again[:2] == first[:2]
    assert again[2] is True  # the corrupt file answered nothing
    assert json.loads(cache.read_text())["answers"]


# -- the relay ----------------------------------------------------------------------------------
async def test_a_tool_call_passes_with_its_progress_and_log_notifications(tmp_path):
    logged: list[str] = []
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_log(params) -> None:
        logged.append(params.data["msg"])

    from mcp import ClientSession as Session
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=PYTHON, args=[DEMO, "front", "ok"], env=base_env(), cwd=str(tmp_path)
    )
    for _ in range(2):  # cold, then warm: the call passes either way
        progress.clear()
        logged.clear()
        async with (
            stdio_client(params) as (read, write),
            Session(read, write, logging_callback=on_log) as session,
        ):
            await session.initialize()
            assert [tool.name for tool in (await session.list_tools()).tools] == ["count_to"]
            result = await session.call_tool("count_to", {"n": 3}, progress_callback=on_progress)
        assert not result.is_error
        assert result.content[0].text == "counted to 3"
        assert [(value, total) for value, total, _ in progress] == [(1, 3), (2, 3), (3, 3)]
        assert logged == ["counted 1", "counted 2", "counted 3"]


def test_closing_stdin_ends_the_bundle_child(tmp_path):
    front = subprocess.Popen(
        [PYTHON, "-m", "servers.stdio_front", *BUNDLE_ARGS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=base_env(VALOR_STDIO_FRONT_START="eager"),  # the bundle starts at once
        cwd=tmp_path,
    )
    try:
        bundle = wait_until(lambda: next(iter(psutil.Process(front.pid).children()), None))
        assert "servers.bundle" in " ".join(bundle.cmdline())
        front.stdin.write(json.dumps(INITIALIZE_REQUEST).encode() + b"\n")  # cold: the bundle's
        front.stdin.flush()
        answer = json.loads(front.stdout.readline())
        assert answer["id"] == INITIALIZE_REQUEST["id"] and "result" in answer
        front.stdin.close()
        assert front.wait(timeout=60) == 0
        wait_until(lambda: not bundle.is_running() or bundle.status() == psutil.STATUS_ZOMBIE)
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()


def test_a_bundle_that_cannot_start_answers_every_request_with_an_error(tmp_path):
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "x"}},
        {"jsonrpc": "2.0", "id": "two", "method": "tools/call", "params": {"name": "count_to"}},
    ]
    completed = subprocess.run(
        [PYTHON, DEMO, "front", "fail"],
        input="".join(json.dumps(line) + "\n" for line in lines),
        capture_output=True,
        text=True,
        env=base_env(),
        cwd=tmp_path,
        timeout=120,
    )
    answers = {answer["id"]: answer for answer in map(json.loads, completed.stdout.splitlines())}
    assert set(answers) == {1, "two"}
    for answer in answers.values():
        assert answer["error"]["code"] == stdio_front.UNAVAILABLE
        assert "tools are unavailable" in answer["error"]["message"]
        assert "exited (code 3)" in answer["error"]["message"]
        assert FAILURE_WORDS in answer["error"]["message"]
    assert FAILURE_WORDS in completed.stderr  # the bundle's own words reach the client's log


def test_the_escape_hatch_runs_the_bundle_itself(tmp_path):
    completed = subprocess.run(
        [PYTHON, "-m", "servers.stdio_front", *BUNDLE_ARGS],
        input=json.dumps(INITIALIZE_REQUEST) + "\n",
        capture_output=True,
        text=True,
        env=base_env(VALOR_STDIO_FRONT="off"),
        cwd=tmp_path,
        timeout=120,
    )
    assert json.loads(completed.stdout.splitlines()[0])["result"]["serverInfo"]["name"]
    assert cache_files() == []  # no front ran


@pytest.mark.parametrize("start", stdio_front.START_POLICIES)
def test_stdin_closing_early_still_gets_the_answers_owed(tmp_path, start):
    completed = subprocess.run(
        [PYTHON, "-m", "servers.stdio_front", *BUNDLE_ARGS],
        input=json.dumps(INITIALIZE_REQUEST) + "\n",
        capture_output=True,
        text=True,
        env=base_env(VALOR_STDIO_FRONT_START=start),
        cwd=tmp_path,
        timeout=120,
    )
    first = json.loads(completed.stdout.splitlines()[0])
    assert first["id"] == INITIALIZE_REQUEST["id"]
    assert first["result"]["serverInfo"]["name"] == "valor-tools"
