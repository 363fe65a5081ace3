"""The ``valor`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Valor: Claude Code as a conversational development partner, over MCP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich panels show a flag as `--all <bool>`, as if it took a value.
    rich_markup_mode=None,
)

HELP_FLAGS = frozenset({"--help", "-h"})


def _print_version(value: bool) -> None:
    if value:
        from servers.core.version import valor_version

        typer.echo(f"valor {valor_version()}")
        raise typer.Exit()


@app.callback()
def _every_command(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print Valor's version."
        ),
    ] = False,
) -> None:
    """Valor: Claude Code as a conversational development partner, over MCP."""
    # Bad settings stop every command before it starts: one line per problem, exit code 2.
    # Help still works (it reads no setting).
    if not HELP_FLAGS & set(sys.argv[1:]):
        from servers.core.settings import exit_on_bad_settings

        exit_on_bad_settings()


def _configure_logging(kind: str) -> None:
    """This process logs to LOG_DIR/<kind>.log, and quietly to the console (warnings)."""
    from servers.core.logs import setup_logging

    setup_logging(kind)


@app.command()
def serve(
    name: Annotated[str | None, typer.Argument(help="Server name, e.g. telegram-tools")] = None,
    transport: Annotated[str, typer.Option(help="stdio or http")] = "stdio",
    all_servers: Annotated[
        bool, typer.Option("--all", help="Every server in one process (stdio, or with --http)")
    ] = False,
    http: Annotated[bool, typer.Option("--http", help="Shorthand for --transport http")] = False,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default from settings)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings)")] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote", help="Allow a non-loopback --host (put a TLS front before it)"
        ),
    ] = False,
    direct: Annotated[
        bool,
        typer.Option("--direct", help="stdio --all: run the bundle without its caching front"),
    ] = False,
) -> None:
    """Run one MCP server, or every server at once (one stdio process, or HTTP on loopback)."""
    from servers import SERVERS, load_server
    from servers.core.settings import get_settings

    settings = get_settings()
    if http:
        transport = "http"
    if transport not in ("stdio", "http"):
        raise typer.BadParameter("transport must be stdio or http", param_hint="--transport")
    bind_host = host or settings.http_host
    bind_port = settings.http_port if port is None else port
    if all_servers and transport == "stdio":
        if not direct:  # the front answers listings from its cache and starts the bundle
            from servers.stdio_front import main as front

            front([])
            return
        from servers.bundle import bundle

        bundle().run(transport="stdio", show_banner=False)
        return
    if all_servers:
        _configure_logging("host")
        _serve_http(bind_host, bind_port, None, allow_remote or settings.http_allow_remote)
        return
    if name is None:
        raise typer.BadParameter(f"name a server ({', '.join(SERVERS)}) or use --all")
    try:
        server = load_server(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    if transport == "stdio":
        server.run(transport="stdio", show_banner=False)
    else:
        _configure_logging("host")
        _serve_http(bind_host, bind_port, [name], allow_remote or settings.http_allow_remote)


def _serve_http(host: str, port: int, names: list[str] | None, allow_remote: bool) -> None:
    """Host the servers behind the token, Host and Origin checks of ``servers.hosting``."""
    import uvicorn

    from servers import SERVERS
    from servers.core.errors import ValorError
    from servers.core.mcp_config import endpoint
    from servers.hosting import build_app, check_bind_host

    try:
        check_bind_host(host, allow_remote)
        application = build_app(names=names)
    except ValorError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    try:  # bound here and handed to uvicorn: a busy port is one line, before any URL
        listener = listening_socket(host, port)
    except OSError as exc:
        typer.echo(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Another process (another "
            "Valor host?) may hold the port; choose one with --port or VALOR_HTTP_PORT.",
            err=True,
        )
        raise typer.Exit(1) from None
    port = listener.getsockname()[1]
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    for name in names or SERVERS:
        typer.echo(f"{name}: {endpoint(base, name)}", err=True)
    typer.echo(
        "Every request needs a bearer token: `valor token create --operator` (or --chat N).",
        err=True,
    )
    config = uvicorn.Config(application, log_level="warning", log_config=None)  # Valor logs
    uvicorn.Server(config).run(sockets=[listener])


def listening_socket(host: str, port: int) -> Any:
    """A TCP socket bound to ``host:port`` (port 0: a free one); OSError when it cannot be."""
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        listener.bind(address)
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


@app.command("mcp-config")
def mcp_config(
    client: Annotated[
        str, typer.Option(help="claude-code (.mcp.json), claude-desktop or cursor")
    ] = "claude-code",
    transport: Annotated[
        str, typer.Option(help="stdio (Valor started by the client) or http (a running host)")
    ] = "stdio",
    per_server: Annotated[
        bool, typer.Option("--per-server", help="stdio: one entry per server, not one process")
    ] = False,
    server: Annotated[
        list[str] | None, typer.Option("--server", help="Only this server (repeatable)")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="http: the host's base URL (default from settings)")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="http: a token from `valor token create` (- reads stdin)")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="File to write (default: the client's)")
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print", help="Print the config instead of writing it")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file")] = False,
    direct: Annotated[
        bool, typer.Option("--direct", help="stdio: run the bundle without its caching front")
    ] = False,
) -> None:
    """Write a ready MCP client config for Valor's tools (absolute paths: works anywhere)."""
    from pathlib import Path

    from servers import SERVERS
    from servers.core import client_config
    from servers.core.settings import get_settings

    unknown = sorted(set(server or ()) - set(SERVERS))
    if unknown:
        raise typer.BadParameter(f"unknown server(s) {unknown}; known: {', '.join(SERVERS)}")
    if token == "-":  # noqa: S105 - "-" means: read the token from stdin
        token = sys.stdin.readline().strip()
    if transport == "http" and url is None:
        settings = get_settings()
        url = f"http://{settings.http_host}:{settings.http_port}"
    try:
        config = client_config.build(
            client,
            transport,
            server or list(SERVERS),
            per_server=per_server,
            subset=bool(server),
            direct=direct,
            url=url,
            token=token,
        )
        if print_config:
            typer.echo(client_config.to_text(config), nl=False)
            return
        path = Path(output) if output else client_config.default_path(client)
        written = client_config.write_config(path, config, force=force)
    except client_config.ClientConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {written} ({', '.join(config['mcpServers'])})", err=True)


async def _list_tools() -> dict[str, list[Any]]:
    from servers import load_all

    return {name: list(await server.list_tools()) for name, server in load_all().items()}


@app.command()
def tools(
    name: Annotated[
        str | None,
        typer.Argument(help="One tool (or server.tool): its description and input schema"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON: server, name, description, input schema")
    ] = False,
) -> None:
    """List every server and its tools, or show one tool with its input schema."""
    listing = asyncio.run(_list_tools())
    rows = [
        tool_row(server_name, tool)
        for server_name, server_tools in listing.items()
        for tool in sorted(server_tools, key=lambda t: t.name)
    ]
    if name is not None:
        server_name, tool_name = split_tool_name(name)
        rows = [r for r in rows if r["name"] == tool_name and server_name in (None, r["server"])]
        if not rows:
            typer.echo(f"No tool named {name!r}; `valor tools` lists them.", err=True)
            raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(rows if name is None else rows[0], indent=2, ensure_ascii=False))
        return
    if name is not None:
        row = rows[0]
        typer.echo(f"{row['server']}.{row['name']}\n")
        typer.echo(_wrapped(row["description"], indent=""))
        typer.echo("\nInput schema:")
        typer.echo(json.dumps(row["input_schema"], indent=2, ensure_ascii=False))
        return
    current = None
    for row in rows:
        if row["server"] != current:
            current = row["server"]
            typer.echo(("\n" if current != rows[0]["server"] else "") + current)
        typer.echo(f"  {row['name']}")
        typer.echo(_wrapped(row["description"], indent="      "))


def tool_row(server_name: str, tool: Any) -> dict[str, Any]:
    return {
        "server": server_name,
        "name": tool.name,
        "description": " ".join((tool.description or "").split()),
        "input_schema": tool.parameters,
    }


def _wrapped(text: str, indent: str) -> str:
    import shutil
    import textwrap

    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))
    return textwrap.fill(
        text or "(no description)", width=width, initial_indent=indent, subsequent_indent=indent
    )


def split_tool_name(qualified: str) -> tuple[str | None, str]:
    """Accept ``tool``, ``server.tool`` or Claude Code's ``mcp__server__tool``."""
    if qualified.startswith("mcp__"):
        _, server, tool = qualified.split("__", 2)
        return server, tool
    if "." in qualified:
        server, tool = qualified.split(".", 1)
        return server, tool
    return None, qualified


async def call_tool(qualified: str, arguments: dict[str, Any], progress_handler: Any = None) -> Any:
    """Call one tool through a real (in-memory) MCP client; returns the CallToolResult.
    ``progress_handler(progress, total, message)`` hears the tool's progress notifications."""
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
    async with Client(server, progress_handler=progress_handler) as client:
        return await client.call_tool(tool_name, arguments, raise_on_error=False)


@contextlib.contextmanager
def progress_bar() -> Iterator[Any]:
    """A rich progress bar on stderr, shown from the tool's first progress notification on;
    yields the client's progress handler."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    task: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        text = message or "working"
        text = text if len(text) <= 40 else text[:39] + "…"  # room for the bar on 80 columns
        if not task:
            bar.start()
            task.append(bar.add_task(text, total=total))
        bar.update(task[0], completed=progress, total=total, description=text)

    try:
        yield on_progress
    finally:
        if task:
            bar.stop()


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
    from servers.core.logs import setup_logging

    setup_logging("cli", console=False)  # FastMCP's "Error calling tool" lands in LOG_DIR/cli.log
    try:
        with progress_bar() as on_progress:
            result = asyncio.run(call_tool(tool, arguments, on_progress))
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


def print_capabilities(report: list[Any] | None = None) -> bool:
    """Print a capability report (default: the quick one); True when nothing is broken."""
    from servers.core.doctor import BROKEN, capability_report
    from servers.core.settings import get_settings

    if report is None:
        report = capability_report(get_settings())
    width = max(len(item.capability) for item in report)
    for item in report:
        typer.echo(f"{item.state:7} {item.capability:{width}}  {item.detail}")
    return not any(item.state == BROKEN for item in report)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts")] = False,
) -> None:
    """Check every capability for real: ok, off (not configured) or broken.

    Exits 1 when a configured capability is broken, 0 otherwise."""
    from servers.core.doctor import BROKEN, diagnose, report_json
    from servers.core.env_file import env_file_path
    from servers.core.settings import get_settings

    report = diagnose(get_settings())
    if as_json:
        typer.echo(report_json(report))
    else:
        env_file = env_file_path()
        typer.echo(f"settings: the environment and {env_file}", nl=False)
        typer.echo("" if env_file.is_file() else " (absent)")
        print_capabilities(report)
    raise typer.Exit(1 if any(item.state == BROKEN for item in report) else 0)


@app.command()
def daemon(
    once: Annotated[
        str | None,
        typer.Option("--once", help="Run one job (health, cleanup or daydream) and exit"),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="--once daydream: run even when the machine is busy"),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="Console: -v info, -vv debug"),
    ] = 0,
) -> None:
    """The main job: host every tool, run maintenance as tool calls, run the promise workers.

    Logs go to LOG_DIR/daemon.log; the console shows warnings and up unless -v."""
    from scheduler.daemon import JOBS, outcome_json, run_daemon, run_once
    from servers.core.logs import setup_logging
    from servers.core.settings import get_settings

    settings = get_settings()
    setup_logging("daemon", verbosity=verbose, settings=settings)
    if force and once != "daydream":
        raise typer.BadParameter("only with --once daydream", param_hint="--force")
    if once is not None:
        if once not in JOBS:
            raise typer.BadParameter(f"jobs: {', '.join(JOBS)}", param_hint="--once")
        outcome = asyncio.run(run_once(settings, once, force=force))
        typer.echo(outcome_json(outcome))
        raise typer.Exit(0 if outcome.ok else 1)
    typer.echo("Valor daemon starting. Capabilities:", err=True)
    print_capabilities()
    raise typer.Exit(asyncio.run(run_daemon(settings)))


@app.command()
def worker(
    workers: Annotated[int, typer.Option(help="Worker threads")] = 2,
    name: Annotated[
        str | None,
        typer.Option(help="Remote: this worker's name in the daemon's records (default: host)"),
    ] = None,
) -> None:
    """Run promise workers only. With VALOR_WORKER_TOOLS_URL set: a remote worker (the Redis
    queue, the daemon's tools endpoint and a worker token; never the daemon's store). Without:
    a spare on the daemon's machine, sharing its store."""
    from servers.core.settings import get_settings

    settings = get_settings()
    _configure_logging("worker")
    if settings.worker_tools_url:
        from scheduler.worker import run_remote_worker

        raise typer.Exit(run_remote_worker(settings, workers, name))
    from scheduler.daemon import run_workers

    raise typer.Exit(run_workers(settings, workers))


@app.command()
def chat(
    chat_id: Annotated[int, typer.Option(help="Chat id the console conversation uses")] = 0,
) -> None:
    """Talk to Valor in the terminal: the bridge with a console transport (no Telegram)."""
    from bridge.console import run_console
    from servers.core.errors import ValorError

    _configure_logging("bridge")
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
        str | None,
        typer.Option("--env-file", help="Where TELEGRAM_SESSION is stored (default: Valor's .env)"),
    ] = None,
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
    if env_file is None:
        from servers.core.env_file import env_file_path

        env_file = str(env_file_path())
    write_env_value(Path(env_file), SESSION_KEY, session)
    typer.echo(f"Logged in as {name}. {SESSION_KEY} stored in {env_file} (keep it secret).")


token_app = typer.Typer(
    help="Bearer tokens for the HTTP-hosted tools: create (printed once), list, revoke.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    chat: Annotated[
        int | None, typer.Option("--chat", help="The one chat the token may reach")
    ] = None,
    operator: Annotated[
        bool, typer.Option("--operator", help="Every tool of every server")
    ] = False,
    worker: Annotated[
        bool,
        typer.Option("--worker", help="A remote promise worker's (no tool; claims promises)"),
    ] = False,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="operator, chat or server:<name> (repeatable)"),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Who it is for (a label)")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 30d, 12h, 90m, 1y")] = "30d",
) -> None:
    """Mint a token and print it once (it is not stored; only its id is)."""
    from servers import SERVERS
    from servers.core import tokens_issued
    from servers.core.errors import ValorError
    from servers.core.settings import get_settings
    from servers.core.store import get_store
    from servers.core.trust import load_scope_secret

    settings = get_settings()
    try:
        ttl_seconds = tokens_issued.parse_ttl(ttl)
        principal = tokens_issued.principal_for(
            chat_id=chat,
            operator=operator,
            scopes=scope or [],
            name=name,
            known_servers=tuple(SERVERS),
            worker=worker,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        secret = load_scope_secret(settings)
    except ValorError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    token, issued = tokens_issued.issue_token(
        get_store(settings.db_path), secret, principal, ttl_seconds
    )
    typer.echo(token)
    typer.echo(
        f"token {issued.id} ({_describe_token(issued)}), expires {_when(issued.expires_at)}. "
        "Shown once: store it now. `valor token revoke "
        f"{issued.id}` ends it.",
        err=True,
    )


@token_app.command("list")
def token_list() -> None:
    """Every token `valor token create` issued, with its state."""
    from servers.core import tokens_issued
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    issued = tokens_issued.list_tokens(get_store(get_settings().db_path))
    if not issued:
        typer.echo("No tokens issued.")
        return
    for item in issued:
        typer.echo(
            f"{item.id}  {item.state:8} {_describe_token(item):40} "
            f"created {_when(item.created_at)}  expires {_when(item.expires_at)}"
        )


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The id `token list` shows")],
) -> None:
    """Revoke a token: every host refuses it from the next request on."""
    from servers.core import tokens_issued
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    if not tokens_issued.revoke_token(get_store(get_settings().db_path), token_id):
        typer.echo(f"No issued token has the id {token_id!r}; `valor token list` shows them.")
        raise typer.Exit(1)
    typer.echo(f"Revoked {token_id}.")


def _describe_token(item: Any) -> str:
    parts = [item.kind]
    if item.chat_id is not None:
        parts.append(f"chat {item.chat_id}")
    parts.extend(s for s in item.scopes if s.startswith("server:"))
    if item.name:
        parts.append(repr(item.name))
    return ", ".join(parts)


def _when(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


history_app = typer.Typer(
    help="The conversation store: import a chat's history, rebuild its memory.",
    no_args_is_help=True,
)
app.add_typer(history_app, name="history")


@history_app.command("import")
def history_import(
    file: Annotated[
        Path, typer.Argument(help="Telegram Desktop's result.json, or JSON lines of messages")
    ],
    chat: Annotated[
        int | None,
        typer.Option("--chat", help="Put a single chat's messages into this chat id instead"),
    ] = None,
) -> None:
    """Import chat history (idempotent: importing the same file again adds nothing)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from servers.core.history_import import ImportFileError, import_file
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    bar = Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    )

    def on_progress(done: int, total: int) -> None:
        if not bar.tasks:
            bar.start()
            bar.add_task("import", total=total)
        bar.update(bar.tasks[0].id, completed=done, total=total)

    try:
        store = get_store(get_settings().db_path)
        result = import_file(store, file, chat_id=chat, progress=on_progress)
    except ImportFileError as exc:
        typer.echo(f"error: {exc} Nothing was imported.", err=True)
        raise typer.Exit(1) from None
    finally:
        bar.stop()
    typer.echo(
        f"Imported {result.added:,} new of {result.messages:,} messages ({result.format}) into "
        f"{result.chats} chat(s); chat memory holds {result.memory_items:,} facts for them."
    )


@history_app.command("rebuild-memory")
def history_rebuild_memory(
    chat: Annotated[int | None, typer.Option("--chat", help="Only this chat")] = None,
) -> None:
    """Extract the chat memory again from stored messages (those recorded before it existed)."""
    from servers.core import chat_memory
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    store = get_store(get_settings().db_path)
    with store.transaction() as conn:
        written = chat_memory.rebuild(conn, chat)
    typer.echo(f"Chat memory rebuilt: {written:,} facts extracted (duplicates merged).")


budget_app = typer.Typer(
    help="Daily spending caps, changed while the bridge runs: show, set, reset.",
    no_args_is_help=True,
)
app.add_typer(budget_app, name="budget")
CapArg = Annotated[str, typer.Argument(help="per-chat-day or per-day")]


@budget_app.command("show")
def budget_show() -> None:
    """The daily caps in force, where each comes from, and today's spend."""
    from servers.core import spending
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    settings = get_settings()
    store = get_store(settings.db_path)
    overrides = spending.cap_overrides(store)
    for cap, usd in spending.daily_caps(store, settings).items():
        source = "set with `valor budget set`" if cap in overrides else "from the settings"
        shown = f"${usd:.2f}" if usd is not None else "no cap"
        typer.echo(f"{cap}: {shown} ({source})")
    window = spending.Window.containing()
    typer.echo(f"spent today ({window.day}, UTC): ${spending.spent(store, window):.4f}")


@budget_app.command("set")
def budget_set(
    cap: CapArg,
    usd: Annotated[str, typer.Argument(help="Dollars per day, or none for no cap")],
) -> None:
    """Override a daily cap now; a running bridge applies it within a second (held messages
    are answered when the new cap allows)."""
    from servers.core import spending
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    try:
        amount = None if usd.strip().lower() == "none" else float(usd)
        spending.set_cap(get_store(get_settings().db_path), cap, amount)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"{cap}: {'no cap' if amount is None else f'${amount:.2f}'} from now on.")


@budget_app.command("reset")
def budget_reset(cap: CapArg) -> None:
    """Drop an override set with `valor budget set`: the setting holds again."""
    from servers.core import spending
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    if cap not in spending.LIVE_CAPS:
        raise typer.BadParameter(f"one of {', '.join(spending.LIVE_CAPS)}")
    dropped = spending.reset_cap(get_store(get_settings().db_path), cap)
    typer.echo(f"{cap}: {'back to' if dropped else 'already'} the setting.")


def main() -> None:
    import os

    # Every file and folder a `valor` process creates is owner-only (its store, run configs,
    # logs, media): the same umask as servers.core.app.PRIVATE_UMASK, set before anything runs.
    os.umask(0o077)
    app()


if __name__ == "__main__":
    main()
