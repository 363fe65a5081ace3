"""The command line and environment of a headless Claude Code run.

``ClaudeRun`` says what to run; ``run_argv`` turns it into an argv list (never a shell string:
the prompt goes on stdin), always with the deny rules of ``protected_path_rules``, and
``build_env`` into the process's environment: the chat it serves (``VALOR_CHAT_ID``,
``VALOR_USER_ID``, ``VALOR_USER_NAME``, ``VALOR_LAUNCHED_BY``) for hooks and stdio servers, and
none of Valor's other secrets (Telegram session, OpenAI/Notion keys …).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servers.core.settings import Settings


@dataclass
class ClaudeRun:
    """What to run. ``env`` is the base environment (default: this process's)."""

    prompt: str
    session_id: str | None = None
    chat_id: int | None = None
    user_id: int | None = None
    user_name: str = ""
    launched_by: str = "bridge"
    mcp_config: Path | None = None
    strict_mcp_config: bool = True
    expected_servers: Sequence[str] = ()
    allowed_tools: Sequence[str] = ()
    disallowed_tools: Sequence[str] = ()  # added to protected_path_rules(), never replacing them
    append_system_prompt: str | None = None
    permission_prompt_tool: str | None = None  # mcp__<server>__<tool> asked about other tools
    max_budget_usd: float | None = None  # Claude Code stops the run itself past this cost
    workdir: Path | None = None
    timeout_seconds: float | None = None
    env: Mapping[str, str] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process_kind: str = "claude"


def protected_path_rules(settings: Settings) -> list[str]:
    """Deny rules for files a run must never read: .env files (every secret) and the store,
    run configs and Telegram state in the data directory (other chats, tokens). Claude Code
    applies Read rules to Bash commands that read those paths too (measured with 2.1.332)."""
    from servers.core.env_file import env_file_path
    from servers.core.settings import REPO_ROOT

    data = Path(settings.data_dir).resolve()
    return [
        "Read(./.env)",
        f"Read(/{REPO_ROOT}/.env)",
        f"Read(/{env_file_path().resolve()})",
        f"Read(/{data}/valor.db*)",
        f"Read(/{data}/run/**)",
        f"Read(/{data}/telegram/**)",
    ]


def build_argv(claude_bin: str, run: ClaudeRun) -> list[str]:
    """The argv for ``run`` as given; a run starts with ``run_argv``, which adds the deny rules."""
    argv = [claude_bin, "-p", "--output-format", "stream-json", "--verbose"]
    if run.session_id:
        argv += ["--resume", run.session_id]
    if run.mcp_config is not None:
        argv += ["--mcp-config", str(run.mcp_config)]
    if run.strict_mcp_config:
        # Only the servers named here: a workdir's own .mcp.json would start eight stdio servers.
        argv.append("--strict-mcp-config")
    if run.allowed_tools:
        argv += ["--allowedTools", ",".join(run.allowed_tools)]
    if run.disallowed_tools:
        argv += ["--disallowedTools", ",".join(run.disallowed_tools)]
    if run.append_system_prompt:
        argv += ["--append-system-prompt", run.append_system_prompt]
    if run.permission_prompt_tool:
        argv += ["--permission-prompt-tool", run.permission_prompt_tool]
    if run.max_budget_usd is not None:
        argv += ["--max-budget-usd", f"{run.max_budget_usd:.6f}"]
    return argv


def run_argv(claude_bin: str, run: ClaudeRun, settings: Settings) -> list[str]:
    """The argv a run starts with: ``build_argv`` with ``protected_path_rules`` always denied."""
    protected = [*protected_path_rules(settings), *run.disallowed_tools]
    return build_argv(claude_bin, dataclasses.replace(run, disallowed_tools=protected))


def secret_env_names() -> set[str]:
    """Environment names of every secret setting, so they never reach Claude Code's Bash."""
    from pydantic import SecretStr

    from servers.core.settings import Settings

    # The promise queue's URL may carry the Redis password; with it a run could write to the
    # queue the daemon and the workers read (huey's payloads are pickles).
    names: set[str] = {"VALOR_PROMISE_QUEUE_URL"}
    for name, info in Settings.model_fields.items():
        if SecretStr not in getattr(info.annotation, "__args__", (info.annotation,)):
            continue
        names.add(f"VALOR_{name.upper()}")
        alias = info.validation_alias
        if alias is not None:
            names.update(str(choice) for choice in alias.choices)
    return names


def _clean_env_value(value: object, limit: int = 200) -> str:
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text[:limit]


def build_env(run: ClaudeRun, settings: Settings) -> dict[str, str]:
    """The run's environment: the base minus every secret, plus the model API and the chat."""
    base = dict(os.environ if run.env is None else run.env)
    # Settings reads names in any letter case (``telegram_session=`` too), so compare that way.
    secrets = {name.upper() for name in secret_env_names()}
    for name in [key for key in base if key.upper() in secrets and key != "ANTHROPIC_API_KEY"]:
        del base[name]
    if settings.anthropic_api_key is not None:
        base["ANTHROPIC_API_KEY"] = settings.anthropic_api_key.get_secret_value()
    if settings.anthropic_base_url:
        base["ANTHROPIC_BASE_URL"] = settings.anthropic_base_url
    base["CLAUDE_CODE_MAX_RETRIES"] = str(settings.claude_max_retries)
    base["VALOR_DATA_DIR"] = str(settings.data_dir)
    base["VALOR_LAUNCHED_BY"] = _clean_env_value(run.launched_by, 40)
    for name, value in (("VALOR_CHAT_ID", run.chat_id), ("VALOR_USER_ID", run.user_id)):
        if value is None:
            base.pop(name, None)
        else:
            base[name] = str(int(value))
    base["VALOR_USER_NAME"] = _clean_env_value(run.user_name)
    base.update({k: str(v) for k, v in run.extra_env.items()})
    return base
