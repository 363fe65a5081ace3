"""The ``valor`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Valor: Claude Code as a conversational development partner, over MCP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _configure_logging() -> None:
    from servers.core.settings import get_settings

    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve(
    name: Annotated[str | None, typer.Argument(help="Server name, e.g. telegram-tools")] = None,
    transport: Annotated[str, typer.Option(help="stdio or http")] = "stdio",
    all_servers: Annotated[
        bool, typer.Option("--all", help="Host every server in one process (needs --http)")
    ] = False,
    http: Annotated[bool, typer.Option("--http", help="Shorthand for --transport http")] = False,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default from settings)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings)")] = None,
) -> None:
    """Run one MCP server, or every server at once over HTTP on loopback."""
    from servers import SERVERS, load_server
    from servers.core.settings import get_settings

    settings = get_settings()
    if http:
        transport = "http"
    if transport not in ("stdio", "http"):
        raise typer.BadParameter("transport must be stdio or http", param_hint="--transport")
    bind_host = host or settings.http_host
    bind_port = settings.http_port if port is None else port
    if all_servers:
        if transport != "http":
            raise typer.BadParameter("--all hosts the servers over HTTP: add --http")
        _configure_logging()
        _serve_all(bind_host, bind_port)
        return
    if name is None:
        raise typer.BadParameter(f"name a server ({', '.join(SERVERS)}) or use --all --http")
    try:
        server = load_server(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    if transport == "stdio":
        server.run(transport="stdio", show_banner=False)
    else:
        _configure_logging()
        server.run(transport="http", host=bind_host, port=bind_port, show_banner=False)


def _serve_all(host: str, port: int) -> None:
    import uvicorn

    from servers import SERVERS
    from servers.hosting import build_app, endpoint

    base = f"http://{host}:{port}"
    for name in SERVERS:
        typer.echo(f"{name}: {endpoint(base, name)}", err=True)
    uvicorn.run(build_app(), host=host, port=port, log_level="warning")


async def _list_tools() -> dict[str, list[Any]]:
    from servers import load_all

    return {name: list(await server.list_tools()) for name, server in load_all().items()}


@app.command()
def tools() -> None:
    """List every server and its tools."""
    listing = asyncio.run(_list_tools())
    for server_name, server_tools in listing.items():
        typer.echo(server_name)
        for tool in sorted(server_tools, key=lambda t: t.name):
            summary = (tool.description or "").strip().splitlines()[0:1]
            typer.echo(f"  {tool.name:34} {summary[0] if summary else ''}")


def split_tool_name(qualified: str) -> tuple[str | None, str]:
    """Accept ``tool``, ``server.tool`` or Claude Code's ``mcp__server__tool``."""
    if qualified.startswith("mcp__"):
        _, server, tool = qualified.split("__", 2)
        return server, tool
    if "." in qualified:
        server, tool = qualified.split(".", 1)
        return server, tool
    return None, qualified


async def call_tool(qualified: str, arguments: dict[str, Any]) -> Any:
    """Call one tool through a real (in-memory) MCP client; returns the CallToolResult."""
    from fastmcp import Client

    from servers import load_all

    server_name, tool_name = split_tool_name(qualified)
    listing = await _list_tools()
    owners = [
        name
        for name, server_tools in listing.items()
        if (server_name in (None, name)) and any(t.name == tool_name for t in server_tools)
    ]
    if not owners:
        raise LookupError(f"No tool named {qualified!r}; `valor tools` lists them.")
    server = load_all()[owners[0]]
    async with Client(server) as client:
        return await client.call_tool(tool_name, arguments, raise_on_error=False)


@app.command()
def call(
    tool: Annotated[str, typer.Argument(help="Tool name (or server.tool)")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object")] = "{}",
) -> None:
    """Call one tool through a real MCP client and print its structured result."""
    try:
        arguments = json.loads(args)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--args is not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise typer.BadParameter("--args must be a JSON object")
    try:
        result = asyncio.run(call_tool(tool, arguments))
    except LookupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        typer.echo(f"error: {text}", err=True)
        raise typer.Exit(1)
    if result.structured_content is not None:
        typer.echo(json.dumps(result.structured_content, indent=2, ensure_ascii=False))
    else:
        for block in result.content:
            typer.echo(getattr(block, "text", repr(block)))


def print_capabilities() -> bool:
    """Print the doctor report; True when everything is configured."""
    from servers.core.doctor import capability_report
    from servers.core.settings import get_settings

    report = capability_report(get_settings())
    width = max(len(item.capability) for item in report)
    for item in report:
        mark = "ok     " if item.ready else "missing"
        typer.echo(f"{mark}  {item.capability:{width}}  {item.detail}")
    return all(item.ready for item in report)


@app.command()
def doctor() -> None:
    """Say, per capability, what is configured and what is missing."""
    print_capabilities()


@app.command()
def daemon(
    once: Annotated[
        str | None,
        typer.Option("--once", help="Run one job (health, cleanup or daydream) and exit"),
    ] = None,
) -> None:
    """The main job: host every tool, run maintenance as tool calls, run the promise workers."""
    from scheduler.daemon import JOBS, outcome_json, run_daemon, run_once
    from servers.core.settings import get_settings

    _configure_logging()
    settings = get_settings()
    if once is not None:
        if once not in JOBS:
            raise typer.BadParameter(f"jobs: {', '.join(JOBS)}", param_hint="--once")
        outcome = asyncio.run(run_once(settings, once))
        typer.echo(outcome_json(outcome))
        raise typer.Exit(0 if outcome.ok else 1)
    typer.echo("Valor daemon starting. Capabilities:", err=True)
    print_capabilities()
    raise typer.Exit(asyncio.run(run_daemon(settings)))


@app.command()
def worker(
    workers: Annotated[int, typer.Option(help="Worker threads")] = 2,
) -> None:
    """Run promise workers only (another machine sharing a Redis promise queue, or a spare)."""
    from scheduler.daemon import run_workers
    from servers.core.settings import get_settings

    _configure_logging()
    raise typer.Exit(run_workers(get_settings(), workers))


@app.command()
def chat(
    chat_id: Annotated[int, typer.Option(help="Chat id the console conversation uses")] = 0,
) -> None:
    """Talk to Valor in the terminal: the bridge with a console transport (no Telegram)."""
    from bridge.console import run_console
    from servers.core.errors import ValorError

    _configure_logging()
    try:
        asyncio.run(run_console(chat_id))
    except ValorError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def login(
    env_file: Annotated[
        str, typer.Option("--env-file", help="Where TELEGRAM_SESSION is stored")
    ] = ".env",
    print_session: Annotated[
        bool, typer.Option("--print", help="Print the session string instead of storing it")
    ] = False,
) -> None:
    """Log a Telegram user account in (interactive) and store its session string."""
    from pathlib import Path

    from bridge.login import SESSION_KEY, check_login_settings, create_session, write_env_value
    from servers.core.errors import ValorError
    from servers.core.settings import get_settings

    try:
        api_id, api_hash = check_login_settings(get_settings())
        session, name = asyncio.run(
            create_session(
                api_id,
                api_hash,
                phone=lambda: typer.prompt("Phone number (international format)"),
                code=lambda: typer.prompt("Login code Telegram sent you"),
                password=lambda: typer.prompt("Two-step verification password", hide_input=True),
            )
        )
    except ValorError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if print_session:
        typer.echo(session)
        return
    write_env_value(Path(env_file), SESSION_KEY, session)
    typer.echo(f"Logged in as {name}. {SESSION_KEY} stored in {env_file} (keep it secret).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
