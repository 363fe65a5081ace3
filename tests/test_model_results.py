"""Results written for the model: every structured result carries ISO 8601 times with a zone,
human units beside raw bytes, durations and rates, and says when a list was cut and how to see
more. Checked three ways: the output schema of every tool (static), the structured content of
the tools that run on local data through a real MCP client, and what the fake Anthropic API
received from the real Claude Code CLI in one multi-tool conversation (``e2e``)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from typing import Any

import pytest
from fastmcp import Client

from servers import SERVERS
from servers.bundle import BUNDLE_NAME, bundle
from servers.core import client_config, history, links, promises
from servers.core.history import Message
from servers.core.model_results import (
    human_bytes,
    human_duration,
    human_percent,
    iso_time,
    more_note,
)
from servers.core.settings import get_settings
from servers.core.store import now as store_now
from tests.fakes import Script, ToolUse, mcp_tool
from tests.fakes.anthropic_api import last_tool_results
from tests.fakes.openai_api import tiny_png
from tests.support import configure
from tests.support.development import write_screenshot

CHAT = 4242
DAY = 86_400


# -- the rules, as a checker over any structured result -------------------------------------------
def readability_problems(value: Any, path: str = "$") -> list[str]:
    """What in a structured result would read badly to a model: a time that is not ISO 8601 with
    a zone, a Unix number, or a raw size, duration or rate with no human reading beside it."""
    problems: list[str] = []
    if isinstance(value, list):
        for index, item in enumerate(value):
            problems += readability_problems(item, f"{path}[{index}]")
    if not isinstance(value, dict):
        return problems
    beside = {item for item in value.values() if isinstance(item, str)}
    for key, item in value.items():
        where = f"{path}.{key}"
        number = isinstance(item, int | float) and not isinstance(item, bool)
        if key.endswith("_at") and item is not None:
            if not (isinstance(item, str) and datetime.fromisoformat(item).tzinfo is not None):
                problems.append(f"{where}: {item!r} is not ISO 8601 with a zone")
        elif number and (key == "bytes" or "bytes_" in key or key.endswith("_bytes")):
            if human_bytes(item) not in beside:
                problems.append(f"{where}: {item} bytes with no readable size beside it")
        elif number and (key == "seconds" or key.endswith("_seconds")):
            if human_duration(item) not in beside:
                problems.append(f"{where}: {item} s with no readable duration beside it")
        elif number and key == "age_hours":
            if human_duration(item * 3600) not in beside:
                problems.append(f"{where}: {item} h with no readable duration beside it")
        elif number and key.endswith("_rate"):
            if human_percent(item) not in beside:
                problems.append(f"{where}: {item} with no percentage beside it")
        elif isinstance(item, float) and 1e9 <= item < 1e11:
            problems.append(f"{where}: {item} looks like a Unix time")
        problems += readability_problems(item, where)
    return problems


def assert_readable(result: dict) -> None:
    problems = readability_problems(result)
    assert not problems, "\n".join(problems)


# -- the helpers -----------------------------------------------------------------------------------
def test_human_readings():
    assert iso_time(0) == "1970-01-01T00:00:00+00:00" and iso_time(None) is None
    assert [human_bytes(n) for n in (0, 999, 1_234, 333_536, 65_127_546_880)] == [
        "0 B",
        "999 B",
        "1.2 kB",
        "334 kB",
        "65 GB",
    ]
    assert [human_duration(s) for s in (0.12, 4.23, 42, 200, 7_500, 3 * DAY + 4 * 3600)] == [
        "120 ms",
        "4.2 s",
        "42 s",
        "3 min 20 s",
        "2 h 5 min",
        "3 d 4 h",
    ]
    assert [human_percent(f) for f in (0.875, 1.0, 3.85)] == ["87.5%", "100%", "385%"]
    assert more_note(10, False, "x") is None
    assert more_note(10, True, "Raise max_results.") == (
        "Only the first 10 are shown; more match. Raise max_results."
    )


def test_alert_messages_read_in_units():
    from servers.core.health import _read

    assert _read("store_bytes", 1.3e9) == "1.3 GB" and _read("tool_success_rate", 0.75) == "75%"
    assert _read("queue_depth", 12) == "12"


def test_the_checker_catches_what_it_should():
    assert readability_problems({"generated_at": 1796020799.37})
    assert readability_problems({"sent_at": "2026-11-30 06:00"})  # no zone
    assert readability_problems({"store_bytes": 333_536})
    assert readability_problems({"age_seconds": 200.0, "age": "200 s"})
    assert not readability_problems({"store_bytes": 333_536, "store": "334 kB"})


# -- every tool's output schema --------------------------------------------------------------------
def _properties(schema: dict, root: dict) -> list[dict]:
    """Every object's properties in a JSON schema, $refs followed."""
    found, stack, seen = [], [schema], set()
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in seen:
            seen.add(ref)
            target = root
            for part in ref.removeprefix("#/").split("/"):
                target = target.get(part, {})
            stack.append(target)
        if isinstance(node.get("properties"), dict):
            found.append(node["properties"])
        stack.extend(v for k, v in node.items() if k not in ("$defs", "properties"))
        stack.extend(node.get("properties", {}).values())
    return found


def _types(prop: dict) -> set[str]:
    return {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])} - {None}


async def test_every_tools_output_schema_declares_readable_fields():
    async with Client(bundle()) as client:
        listing = await client.list_tools()
    checked = 0
    for tool in listing:
        schema = tool.output_schema
        if not schema:
            continue
        for properties in _properties(schema, schema):
            readings = {p.get("description", "") for p in properties.values()}
            for key, prop in properties.items():
                if key.endswith("_at"):
                    assert "number" not in _types(prop), f"{tool.name}.{key} is a Unix number"
                raw = (
                    key == "bytes"
                    or key.endswith(("_bytes", "_seconds", "_rate"))
                    or key in ("seconds", "age_hours", "bytes_before", "bytes_after")
                )
                if raw and _types(prop) & {"number", "integer"}:
                    checked += 1
                    assert {f"{key}, readable", f"{key} as a percentage"} & readings, (
                        f"{tool.name}.{key} has no human reading beside it"
                    )
    assert checked >= 15


async def test_large_results_declare_a_maximum_size():
    from servers.core.app import MAX_RESULT_META

    async with Client(bundle()) as client:
        sizes = {t.name: (t.meta or {}).get(MAX_RESULT_META) for t in await client.list_tools()}
    for name in (
        "search_conversation_history",
        "get_conversation_context",
        "search_links",
        "save_link",
        "run_daydream",
        "daydream_history",
        "list_promises",
        "list_workspace_screenshots",
        "query_notion_projects",
    ):
        assert isinstance(sizes[name], int) and 10_000 <= sizes[name] <= 500_000, name


# -- structured content through a real MCP client, on seeded local data --------------------------
def seed_chat(store) -> None:
    now = store_now()
    history.record_messages(
        store,
        [
            Message(CHAT, n, f"billing note {n}", "alice", 1, "in", now - (5 - n) * 600)
            for n in range(1, 5)
        ],
    )


def seed_everything(store, valor_env) -> dict[str, Any]:
    seed_chat(store)
    for n in (1, 2):
        url = f"https://a.example/r{n}"
        links._upsert(store, url, url, None, f"Release {n}", "notes", ["release"], "model", "")
    first = promises.create_promise(store, None, "summarize the release", "research", None)
    promises.create_promise(store, None, "check the deploy", "research", None)
    settings = get_settings()
    write_screenshot(settings.chat_screenshots_path(None), "t1", "a.png", tiny_png(4, 4), 200)
    write_screenshot(settings.chat_screenshots_path(None), "t1", "b.png", tiny_png(4, 4), 7_500)
    temp = settings.temp_path
    temp.mkdir(parents=True, exist_ok=True)
    old = temp / "old.tmp"
    old.write_bytes(b"x" * 2_345)
    os.utime(old, (old.stat().st_mtime - 3 * DAY,) * 2)
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO tool_calls (server, tool, success, duration_ms, called_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [("telegram-tools", "search_conversation_history", 1, 40.0, store_now() - 60)] * 12,
        )
    (valor_env / "media").mkdir(parents=True, exist_ok=True)
    return {"promise_id": first.id}


def conversation() -> list[dict]:
    """A long conversation with one critical message an hour and a half old."""
    return [
        {"role": "system", "content": "You are Valor."},
        {
            "role": "user",
            "content": "IMPORTANT: never deploy on Fridays.",
            "timestamp": store_now() - 5_400,
        },
    ] + [
        {"role": "user" if n % 2 else "assistant", "content": f"Turn {n}: the release. " * 20}
        for n in range(1, 21)
    ]


@pytest.fixture
def daydream_model(fake_openai, monkeypatch, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "notes.md").write_text("# notes\n")
    fake_openai.chat_reply = "- Tidy the notes"
    configure(
        monkeypatch,
        VALOR_DAYDREAM_BUSY_CPU_PERCENT="100",
        VALOR_DAYDREAM_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_DAYDREAM_MODEL="llama3.2",
        VALOR_DAYDREAM_WORKSPACES=json.dumps([str(workspace)]),
        OPENAI_API_KEY="sk-test-openai-key-000",
        VALOR_OPENAI_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_OPENAI_MAX_RETRIES="0",
    )
    fake_openai.image = tiny_png(8, 6)
    return fake_openai


async def test_each_tools_structured_result_reads_well(store, valor_env, daydream_model):
    seeded = seed_everything(store, valor_env)
    (valor_env / "media" / "photo.png").write_bytes(tiny_png(8, 6))
    calls = {
        "search_conversation_history": {"query": "billing", "chat_id": CHAT, "max_results": 2},
        "get_conversation_context": {"chat_id": CHAT},
        "search_links": {"query": "release", "max_results": 1},
        "list_promises": {"limit": 1},
        "promise_status": {"promise_id": seeded["promise_id"]},
        "list_workspace_screenshots": {"limit": 1},
        "system_health": {},
        "cleanup_resources": {"dry_run": True, "max_age_hours": 1},
        "context_health": {"messages": conversation(), "max_tokens": 600},
        "optimize_context": {"messages": conversation(), "max_tokens": 600},
        "build_context_block": {"chat_id": CHAT},
        "run_daydream": {"dry_run": True},
        "daydream_history": {},
        "create_image": {"prompt": "a lighthouse"},
        "analyze_shared_image": {"image_path": "photo.png"},
        "list_notion_workspaces": {},
        "export_metrics": {},
        "spending_report": {},
    }
    results: dict[str, dict] = {}
    async with Client(bundle()) as client:
        for name, arguments in calls.items():
            answer = await client.call_tool(name, arguments)
            results[name] = answer.structured_content
            text = " ".join(getattr(block, "text", "") for block in answer.content)
            assert json.loads(text) == answer.structured_content, name  # text clients: the same
    for name, result in results.items():
        if name == "optimize_context":  # its messages are the caller's own, in the caller's format
            result = {key: value for key, value in result.items() if key != "messages"}
        problems = readability_problems(result, name)
        assert not problems, "\n".join(problems)
    assert_readable(json.loads(results["export_metrics"]["body"]))

    history_hits = results["search_conversation_history"]
    assert len(history_hits["hits"]) == 2 and history_hits["truncated"] is True
    assert "max_results" in history_hits["how_to_see_more"]
    for name in ("search_links", "list_promises", "list_workspace_screenshots"):
        assert results[name]["truncated"] is True and results[name]["how_to_see_more"], name
    context = results["get_conversation_context"]
    assert context["time_zone"] == "UTC" and context["truncated"] is False
    assert datetime.fromisoformat(context["oldest_at"]).tzinfo is not None
    health = results["system_health"]
    assert datetime.fromisoformat(health["generated_at"]).tzinfo is not None
    assert health["machine"]["memory_used"].endswith("B")
    assert health["tools"][0]["success"] == "100%"
    shot = results["list_workspace_screenshots"]["screenshots"][0]
    assert shot["age"] == "3 min 20 s" or shot["age"].endswith(" s")  # the newer one, ~200 s
    cleanup = results["cleanup_resources"]
    assert cleanup["temp_files"][0]["size"] == "2.3 kB" and cleanup["temp_size"] == "2.3 kB"
    assert results["context_health"]["budget_used"].endswith("%")
    assert results["context_health"]["oldest_critical"]["age"] == "1 h 30 min"
    session = results["daydream_history"]["sessions"][0]
    assert session["duration"] and all(phase["duration"] for phase in session["phases"])
    assert results["create_image"]["size"].endswith("B")


# -- what the model received, through the real CLI -------------------------------------------------
@pytest.mark.e2e
def test_what_the_model_receives_reads_well(
    store, valor_env, claude_bin, claude_env, fake_anthropic, tmp_path
):
    """One Claude Code run over `valor mcp-config`'s stdio bundle calls five tools at once; every
    tool_result the fake Anthropic API received carries readable times, sizes and notes."""
    seed_everything(store, valor_env)
    arguments = {
        "system_health": {},
        "search_conversation_history": {"query": "billing", "chat_id": CHAT, "max_results": 2},
        "get_conversation_context": {"chat_id": CHAT},
        "list_workspace_screenshots": {"limit": 1},
        "list_promises": {},
    }
    calls = [ToolUse(mcp_tool(BUNDLE_NAME, name), args) for name, args in arguments.items()]
    fake_anthropic.responder = Script([calls, "Read them."])
    config = client_config.build("claude-code", "stdio", list(SERVERS))
    config_path = tmp_path / "valor.json"
    config_path.write_text(json.dumps(config))
    completed = subprocess.run(
        [str(claude_bin), "-p", "how are things?", "--output-format", "json",
         "--strict-mcp-config", "--mcp-config", str(config_path),
         "--allowedTools", f"mcp__{BUNDLE_NAME}"],
        env={**claude_env, "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"]},
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert json.loads(completed.stdout)["result"] == "Read them.", completed.stdout[-2000:]

    received = last_tool_results(fake_anthropic.main_requests[-1])
    forwarded = {name.split("__")[-1]: json.loads(text) for name, text in received.items()}
    assert set(forwarded) == set(arguments)
    for name, result in forwarded.items():
        problems = readability_problems(result, name)
        assert not problems, "\n".join(problems)
    health = forwarded["system_health"]
    assert datetime.fromisoformat(health["generated_at"]).tzinfo is not None  # not a Unix float
    assert health["store"].endswith("B") and health["machine"]["disk_free"].endswith("B")
    hits = forwarded["search_conversation_history"]
    assert hits["truncated"] is True and "max_results" in hits["how_to_see_more"]
    assert forwarded["get_conversation_context"]["time_zone"] == "UTC"
    shot = forwarded["list_workspace_screenshots"]["screenshots"][0]
    assert shot["size"].endswith(" B") and shot["age"]
    assert all(
        datetime.fromisoformat(p["created_at"]).tzinfo
        for p in forwarded["list_promises"]["promises"]
    )


def test_conversation_lines_name_their_zone(store):
    """get_conversation_context's text: each line's time says UTC, compactly; the structured
    fields and the lines come from one reading of time (history.iso is iso_time)."""
    history.record_message(store, Message(CHAT, 1, "hello", "Ann", 42, "in", 1_796_000_000))
    rows = history.recent_messages(store, CHAT, 0, 10)
    text, count, cut = history.format_for_model(rows, 10_000)
    assert (text, count, cut) == ("[2026-11-30 00:53 UTC] Ann: hello", 1, False)
    assert history.iso is iso_time and iso_time(1_796_000_000) == "2026-11-30T00:53:20+00:00"
