"""Valor settings: environment variables (prefix ``VALOR_``) and ``.env``.

Standard names users already have (``OPENAI_API_KEY`` …) are accepted as they are. Every external
base URL is a setting, which is also how the tests point the real SDKs at loopback fakes.
Secrets are ``SecretStr``: they never appear in reprs, logs or error text.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from servers.core.env_file import ENV_FILE_VARIABLE, REPO_ROOT, env_file_path
from servers.core.paths import default_data_dir

__all__ = ["REPO_ROOT", "Settings", "get_settings", "settings_problems", "validate_settings"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ChatApprovalPolicy(BaseModel):
    """One chat's approval policy, on top of the global one (``VALOR_APPROVAL_CHAT_POLICIES``)."""

    never_ask: list[str] = Field(default_factory=list, description="Added to the global list.")
    always_deny: list[str] = Field(default_factory=list, description="Added to the global list.")
    on_timeout: Literal["deny", "allow"] | None = Field(
        default=None, description="Replaces VALOR_APPROVAL_ON_TIMEOUT for this chat."
    )


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VALOR_",
        env_file=None,  # the one rule (servers.core.env_file), applied in __init__
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        # JSON values (lists, objects) are decoded by _decode_json below, so a bad one is a
        # validation error naming its variable like any other, not a SettingsError traceback.
        enable_decoding=False,
    )

    def __init__(self, **values: Any) -> None:
        values.setdefault("_env_file", env_file_path())
        super().__init__(**values)

    # --- storage and directories ---
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the SQLite store, media and temporary files live.",
    )
    media_dir: Path | None = Field(
        default=None, description="Images received or generated (default: DATA_DIR/media)."
    )
    screenshots_dir: Path | None = Field(
        default=None, description="Workspace screenshots (default: DATA_DIR/screenshots)."
    )
    log_dir: Path | None = Field(default=None, description="Log files (default: DATA_DIR/logs).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Python logging level (any case)."
    )
    log_max_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="A process's log file (LOG_DIR/<kind>.log) is rotated past this size.",
    )
    log_backup_count: int = Field(
        default=5, ge=1, le=100, description="Rotated log files kept per process kind."
    )
    metrics_port: int = Field(
        default=8766,
        ge=0,
        le=65535,
        description="Loopback port of the daemon's /metrics and /healthz (no token; 0: a free "
        "port).",
    )

    # --- trusted context (set by the launching process, never by the model) ---
    chat_id: int | None = Field(
        default=None,
        description="Chat this process serves; set by the bridge for the servers it launches.",
    )
    scope_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key (16+ characters) signing the bearer tokens of HTTP-hosted servers "
        "(default: a random key generated once into DATA_DIR/scope_secret).",
    )

    # --- hosting the servers over HTTP (daemon, bridge, `valor serve --all --http`) ---
    http_host: str = Field(default="127.0.0.1", description="Loopback address to host on.")
    http_port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port.")
    http_allow_remote: bool = Field(
        default=False,
        description="Allow a non-loopback HTTP_HOST (put a TLS front before it).",
    )
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Extra Host names (or host:port) the host answers, e.g. ["valor.example"]; '
        "loopback names always work. Origins are checked against the same list.",
    )
    jwt_jwks_uri: str | None = Field(
        default=None,
        description="JWKS URL of an identity provider whose JWTs the host also accepts.",
    )
    jwt_issuer: str | None = Field(default=None, description="Required `iss` of accepted JWTs.")
    jwt_audience: str | None = Field(default=None, description="Required `aud` of accepted JWTs.")

    # --- OpenAI (images, vision, summaries) ---
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("OPENAI_API_KEY", "VALOR_OPENAI_API_KEY")
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=_alias("VALOR_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
    )
    openai_chat_model: str = Field(default="gpt-4o-mini", description="Model for summaries.")
    openai_vision_model: str = Field(default="gpt-4o", description="Model for image analysis.")
    openai_image_model: str = Field(default="dall-e-3", description="Model for image generation.")
    openai_timeout_seconds: float = Field(default=60.0, gt=0)

    # --- Perplexity (web search through the openai SDK) ---
    perplexity_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("PERPLEXITY_API_KEY", "VALOR_PERPLEXITY_API_KEY")
    )
    perplexity_base_url: str = Field(default="https://api.perplexity.ai")
    perplexity_model: str = Field(default="sonar")
    perplexity_timeout_seconds: float = Field(default=60.0, gt=0)

    # --- speech to text for voice notes, audio and video notes (servers/core/transcription.py) ---
    transcription_base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible transcription endpoint, e.g. a local Whisper server "
        "(default: VALOR_OPENAI_BASE_URL).",
    )
    transcription_api_key: SecretStr | None = Field(
        default=None, description="Key for that endpoint (default: OPENAI_API_KEY)."
    )
    transcription_model: str = Field(default="whisper-1", description="Speech-to-text model.")
    transcription_timeout_seconds: float = Field(default=120.0, gt=0)
    transcription_max_upload_mb: float = Field(
        default=24.0,
        gt=0,
        description="Largest file sent in one request (OpenAI: 25 MB); longer audio is split "
        "with ffmpeg.",
    )

    # --- Notion ---
    notion_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("NOTION_API_KEY", "VALOR_NOTION_API_KEY")
    )
    notion_base_url: str = Field(default="https://api.notion.com")
    notion_workspaces: dict[str, str] = Field(
        default_factory=dict,
        description='Workspace name to Notion database id, as JSON: {"Valor": "<id>"}.',
    )
    notion_timeout_seconds: float = Field(default=30.0, gt=0)

    # --- Anthropic / Claude Code ---
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("ANTHROPIC_API_KEY", "VALOR_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=_alias("VALOR_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"),
        description="Passed to Claude Code as ANTHROPIC_BASE_URL when set.",
    )
    claude_bin: str | None = Field(
        default=None,
        description="Claude Code executable (default: the repo's pinned node_modules/.bin/claude, "
        "then `claude` on PATH).",
    )
    claude_workdir: Path | None = Field(
        default=None, description="Working directory for Claude Code runs (default: repo root)."
    )
    claude_timeout_seconds: float = Field(default=900.0, gt=0)
    claude_max_retries: int = Field(default=2, ge=0)
    claude_extra_allowed_tools: list[str] = Field(default_factory=list)
    sandbox: Literal["bwrap", "off"] = Field(
        default="bwrap",
        description='OS sandbox of every Claude Code run: "bwrap" (bubblewrap) or "off" (runs '
        "see everything Valor's user can; the operator's explicit choice, logged).",
    )
    bwrap_bin: str | None = Field(
        default=None, description="The bubblewrap executable (default: `bwrap` on PATH)."
    )

    # --- Telegram ---
    telegram_api_id: int | None = Field(
        default=None, validation_alias=_alias("TELEGRAM_API_ID", "VALOR_TELEGRAM_API_ID")
    )
    telegram_api_hash: SecretStr | None = Field(
        default=None, validation_alias=_alias("TELEGRAM_API_HASH", "VALOR_TELEGRAM_API_HASH")
    )
    telegram_session: SecretStr | None = Field(
        default=None,
        validation_alias=_alias("TELEGRAM_SESSION", "VALOR_TELEGRAM_SESSION"),
        description="Telethon StringSession of a user account (created by `valor login`).",
    )
    telegram_bot_token: SecretStr | None = Field(
        default=None, validation_alias=_alias("TELEGRAM_BOT_TOKEN", "VALOR_TELEGRAM_BOT_TOKEN")
    )
    allowed_user_ids: list[int] = Field(default_factory=list)
    allowed_chat_ids: list[int] = Field(default_factory=list)
    operator_chat_id: int | None = Field(default=None, description="Where alerts go.")
    max_concurrent_runs: int = Field(default=4, ge=1)
    # Warm sessions: a resident Claude Code per active chat (servers/core/claude_resident.py).
    warm_sessions: Literal["on", "off"] = Field(
        default="on", description='"off": every message starts its own `claude -p` process.'
    )
    warm_max_processes: int = Field(
        default=4, ge=0, le=1000, description="Chats holding a warm process at once; 0: off."
    )
    warm_idle_seconds: float = Field(default=600.0, gt=0, description="Idle time before closing.")
    warm_max_turns: int = Field(default=50, ge=1, description="Turns before a process is renewed.")
    warm_max_rss_mb: float = Field(
        default=1024.0, gt=0, description="Resident memory (its whole tree) before renewal."
    )
    warm_max_age_seconds: float = Field(
        default=4 * 3600.0, gt=0, description="Age before a process is renewed."
    )

    # --- the bridge core ---
    persona_file: Path | None = Field(
        default=None,
        description="Persona appended to Claude Code's system prompt (default: bridge/persona.md).",
    )
    # --- approvals: a bridge run asks its chat before using a tool it is not allowed up front ---
    approvals: Literal["on", "off"] = Field(
        default="on",
        description='"off": tools not allowed up front are denied without asking (as before).',
    )
    approval_timeout_seconds: float = Field(
        default=300.0, gt=0, le=3600, description="How long a question waits for an answer."
    )
    approval_on_timeout: Literal["deny", "allow"] = Field(
        default="deny", description="What no answer within the timeout means."
    )
    approval_never_ask: list[str] = Field(
        default_factory=list,
        description="Tools allowed without asking: exact names or `mcp__<server>` prefixes.",
    )
    approval_always_deny: list[str] = Field(
        default_factory=list,
        description="Tools refused without asking (wins over every allow): names or prefixes.",
    )
    approval_chat_policies: dict[int, ChatApprovalPolicy] = Field(
        default_factory=dict,
        description='Per chat id: {"never_ask": [...], "always_deny": [...], "on_timeout": ...}.',
    )
    # --- spending caps: a bridge run's cost (Claude Code's total_cost_usd), by UTC day ---
    budget_per_run_usd: float | None = Field(
        default=None, gt=0, description="Claude Code's own --max-budget-usd for each bridge run."
    )
    budget_per_chat_day_usd: float | None = Field(
        default=None, gt=0, description="A chat's spend per UTC day before new runs are refused."
    )
    budget_per_day_usd: float | None = Field(
        default=None, gt=0, description="All chats' spend per UTC day before new runs are refused."
    )
    budget_warn_fraction: float = Field(
        default=0.7, gt=0, lt=1, description="The share of a daily cap that warns the chat once."
    )

    # --- Telegram streaming: send budgets, receipts, media, catch-up ---
    telegram_per_chat_per_second: int = Field(
        default=1, ge=1, description="Messages or edits per second in one chat."
    )
    telegram_group_per_minute: int = Field(
        default=20, ge=1, description="Messages or edits per minute in one group."
    )
    telegram_global_per_second: int = Field(
        default=30, ge=1, description="Messages or edits per second across all chats."
    )
    telegram_rate_margin: float = Field(
        default=0.1, ge=0, le=2, description="Safety margin on every budget (0.1 = 10 % slower)."
    )
    telegram_typing: bool = Field(default=True, description="Show 'typing…' while tools run.")
    telegram_receipt_reaction: str = Field(
        default="👀", description="Reaction that says a message was received; empty: none."
    )
    telegram_final_retry_seconds: float = Field(
        default=3600.0, gt=0, description="How long a failing final answer is retried."
    )
    telegram_max_download_mb: float = Field(
        default=20.0, gt=0, description="Largest incoming photo, document or recording saved."
    )
    telegram_catch_up: bool = Field(
        default=True, description="Fetch messages missed while offline on connect."
    )
    telegram_down_alert_seconds: float = Field(
        default=300.0, gt=0, description="Telegram unreachable this long raises a health alert."
    )

    # --- model for summaries / analysis (OpenAI-compatible; Ollama by default for daydream) ---
    daydream_base_url: str = Field(default="http://127.0.0.1:11434/v1")
    daydream_model: str = Field(default="gemma3")
    daydream_timeout_seconds: float = Field(default=120.0, gt=0)

    # --- the daemon: schedule, daydream and the promise queue ---
    daydream_api_key: SecretStr | None = Field(
        default=None, description="Key for the daydream endpoint (Ollama needs none)."
    )
    daydream_cron: str = Field(
        default="0 */6 * * *", description="When the daydream runs (crontab, local time)."
    )
    daydream_quiet_hours: str = Field(
        default="", description='Local hours with no daydream, e.g. "22:00-07:00"; empty: none.'
    )
    daydream_workspaces: list[Path] = Field(
        default_factory=list,
        description="Repositories the daydream looks at (default: the Claude Code workdir).",
    )
    daydream_insights_file: Path | None = Field(
        default=None, description="Insights file (default: LOG_DIR/daydream_insights.md)."
    )
    daydream_archives_kept: int = Field(default=10, ge=1, le=1000)
    daydream_max_pending_promises: int = Field(
        default=5, ge=0, description="Skip the daydream when more promises than this wait."
    )
    daydream_busy_cpu_percent: float = Field(default=85.0, gt=0, le=100)
    daydream_busy_memory_percent: float = Field(default=92.0, gt=0, le=100)
    health_interval_seconds: float = Field(default=30.0, ge=1)
    cleanup_interval_minutes: float = Field(default=60.0, gt=0)
    daemon_shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="How long running jobs may finish after SIGTERM."
    )
    promise_queue_url: str | None = Field(
        default=None,
        description="redis://… for RedisHuey workers on several machines; unset: SQLite file.",
    )
    promise_workers: int = Field(default=2, ge=0, le=32)
    promise_timeout_seconds: float = Field(default=3600.0, gt=0)
    # --- a remote promise worker (`valor worker` on another machine; servers/core/workers.py) ---
    worker_tools_url: str | None = Field(
        default=None,
        description="The daemon's tools endpoint (its base URL) a remote worker reaches.",
    )
    worker_token: SecretStr | None = Field(
        default=None, description="A remote worker's token (`valor token create --worker`)."
    )
    worker_heartbeat_seconds: float = Field(
        default=15.0,
        ge=0.5,
        le=600,
        description="A remote worker that has not refreshed its heartbeat in Redis for this long "
        "is taken for dead; its promise is queued again once.",
    )
    run_on_workers: bool = Field(
        default=False,
        description="Bridge runs go through the Redis queue to `valor worker` processes (one-shot "
        "runs, progress streamed back through Redis); needs VALOR_PROMISE_QUEUE_URL=redis://…",
    )

    @property
    def daydream_insights_path(self) -> Path:
        return self.daydream_insights_file or self.log_path / "daydream_insights.md"

    @property
    def promise_queue_path(self) -> Path:
        return self.data_dir / "promise_queue.db"

    # --- input size limits on tool arguments (servers/core/app.py check_arguments) ---
    tool_text_max_chars: int = Field(
        default=20_000,
        ge=1_000,
        description="Most characters of text one tool call may carry, all its text arguments "
        "together (context-tools have their own limit).",
    )
    context_tool_max_chars: int = Field(
        default=1_000_000,
        ge=1_000,
        description="Most characters of text one context-tools call (a whole conversation) "
        "may carry.",
    )

    # --- history tool bounds ---
    history_max_results: int = Field(default=50, ge=1, le=500)
    history_max_chars: int = Field(default=20_000, ge=1_000)

    # --- social-tools and notion-tools: limits for images, link fetching, retries ---
    image_max_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="Largest image the image tools read."
    )
    link_fetch_max_bytes: int = Field(
        default=5 * 1024 * 1024, ge=1024, description="Largest page save_link downloads."
    )
    link_fetch_timeout_seconds: float = Field(
        default=20.0, gt=0, description="Whole-fetch deadline for save_link, redirects included."
    )
    link_max_redirects: int = Field(default=5, ge=0, le=20)
    openai_max_retries: int = Field(
        default=2, ge=0, le=10, description="openai SDK retries (429 honours Retry-After)."
    )
    perplexity_max_retries: int = Field(default=2, ge=0, le=10)
    notion_max_retries: int = Field(
        default=3, ge=0, le=10, description="notion-client retries on 429 (Retry-After) and 5xx."
    )
    notion_max_retry_delay_seconds: float = Field(
        default=30.0, gt=0, description="Cap on one Retry-After wait from Notion."
    )
    notion_max_rows: int = Field(default=500, ge=1, le=10_000)

    # --- monitoring-tools and the Claude Code hooks ---
    # The hooks read VALOR_HOOK_* straight from the environment / .env (no pydantic there).
    temp_dir: Path | None = Field(
        default=None, description="Valor's temporary files (default: DATA_DIR/tmp)."
    )
    health_window_hours: float = Field(default=24.0, gt=0, le=24 * 90)
    process_max_age_hours: float = Field(
        default=24.0, gt=0, description="A Valor-started run alive longer than this is stale."
    )
    metrics_retention_days: float = Field(default=30.0, gt=0)
    cleanup_grace_seconds: float = Field(
        default=5.0, ge=0, le=300, description="SIGTERM to SIGKILL wait when ending a stale run."
    )
    hook_history_messages: int = Field(default=20, ge=0, le=500)
    hook_context_max_tokens: int = Field(default=2000, ge=100, le=100_000)

    # --- context-tools ---
    context_summary_model: str | None = Field(
        default=None,
        description="OpenAI-compatible chat model that writes context summaries (uses "
        "OPENAI_API_KEY / VALOR_OPENAI_BASE_URL); unset: extractive summaries.",
    )

    # --- development-tools: workspace screenshots and the bug-report workflow ---
    bug_report_allowed_tools: list[str] = Field(
        default_factory=lambda: ["Bash", "Read", "Write", "Glob", "Grep"],
        description="Claude Code tools a bug-report run may use without asking (--allowedTools).",
    )
    bug_report_timeout_seconds: float = Field(
        default=600.0, gt=0, description="How long one bug-report run may take."
    )
    browser_executable: Path | None = Field(
        default=None,
        description="Chromium for screenshots (default: chromium on PATH); never downloaded.",
    )

    @property
    def temp_path(self) -> Path:
        return self.temp_dir or self.data_dir / "tmp"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("*", mode="before")
    @classmethod
    def _decode_json(cls, value: Any, info: Any) -> Any:
        """A list or object setting arrives as JSON text; a path's ``~`` is the home folder."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and _is_json_type(annotation):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        if _mentions(annotation, Path):
            if isinstance(value, str):
                value = os.path.expanduser(value)
            elif isinstance(value, list):
                value = [os.path.expanduser(v) if isinstance(v, str) else v for v in value]
        return value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "valor.db"

    @property
    def media_path(self) -> Path:
        return self.media_dir or self.data_dir / "media"

    @property
    def screenshots_path(self) -> Path:
        return self.screenshots_dir or self.data_dir / "screenshots"

    def chat_media_path(self, chat_id: int | None) -> Path:
        """One chat's media (photos received, images generated, files it may send); the
        operator's (no chat) under ``operator``. A chat's run sees only its own."""
        return self.media_path / "chats" / _chat_folder(chat_id)

    def chat_screenshots_path(self, chat_id: int | None) -> Path:
        """One chat's screenshots and bug-report captures; the operator's under ``operator``."""
        return self.screenshots_path / "chats" / _chat_folder(chat_id)

    @property
    def log_path(self) -> Path:
        return self.log_dir or self.data_dir / "logs"

    @property
    def workdir(self) -> Path:
        return self.claude_workdir or REPO_ROOT

    def resolve_claude_bin(self) -> str | None:
        if self.claude_bin:
            return self.claude_bin
        pinned = REPO_ROOT / "node_modules" / ".bin" / "claude"
        if pinned.exists():
            return str(pinned)
        from shutil import which

        return which("claude")


def _chat_folder(chat_id: int | None) -> str:
    return "operator" if chat_id is None else str(int(chat_id))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Tests change the environment; this makes the next get_settings() read it again."""
    get_settings.cache_clear()


# --- settings errors as one line per problem (every entry point refuses to start on them) ----
BAD_SETTINGS_EXIT_CODE = 2
_VALUE_SHOWN_CHARS = 60


def validate_settings() -> list[str]:
    """Every problem of the configuration, one line each naming its variable; [] when valid.

    Reads the environment and the ``.env`` file afresh (the cached settings are replaced)."""
    problems: list[str] = []
    configured_file = os.environ.get(ENV_FILE_VARIABLE)
    if configured_file and not env_file_path().is_file():
        problems.append(
            f"{ENV_FILE_VARIABLE}={configured_file!r}: no such file; expected the path of a "
            "readable .env file (or unset it to use the repository's .env)."
        )
    reset_settings_cache()
    try:
        get_settings()
    except (ValidationError, SettingsError) as exc:
        problems.extend(settings_problems(exc))
    return problems


def exit_on_bad_settings(stream: typing.TextIO | None = None) -> None:
    """Print each settings problem on its own line and exit with code 2; return when valid."""
    import sys

    problems = validate_settings()
    if problems:
        print("\n".join(problems), file=stream or sys.stderr, flush=True)
        raise SystemExit(BAD_SETTINGS_EXIT_CODE)


def settings_problems(exc: ValidationError | SettingsError) -> list[str]:
    """pydantic's ValidationError (or pydantic-settings' SettingsError) as one line per
    problem: the variable, its value (never a secret's), what is wrong, and the expected form."""
    if isinstance(exc, SettingsError):
        found = _SETTINGS_ERROR_FIELD.search(str(exc))
        field = found.group(1) if found else None
        return [_problem_line(field, (), "could not be read", None)]
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        field = _field_named(str(loc[0])) if loc else None
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(_problem_line(field, loc[1:], message, error.get("input")))
    return lines


_SETTINGS_ERROR_FIELD = re.compile(r'field "([^"]+)"')


def _field_named(name: str) -> str | None:
    """The Settings field behind ``name`` (a field name or one of its variable names)."""
    if name in Settings.model_fields:
        return name
    for field, info in Settings.model_fields.items():
        if name.upper() in (v.upper() for v in _variables(field, info)):
            return field
    return None


def _variables(field: str, info: Any) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"VALOR_{field.upper()}"]


def _source(names: list[str]) -> tuple[str, str | None, str]:
    """Which variable is set, its raw text and where (the environment or the .env file)."""
    environ = {key.upper(): value for key, value in os.environ.items()}
    for name in names:
        if name.upper() in environ:
            return name, environ[name.upper()], "the environment"
    from servers.core.env_file import dotenv_value

    for name in names:
        value = dotenv_value(name)
        if value is not None:
            return name, value, str(env_file_path())
    return names[0], None, "the environment"


def _problem_line(field: str | None, inner: tuple, message: str, value: Any) -> str:
    if field is None:
        return f"settings: {message}"
    info = Settings.model_fields[field]
    variable, raw, where = _source(_variables(field, info))
    secret = _mentions(info.annotation, SecretStr)
    if secret:
        shown = "=<hidden>"
    elif raw is not None:
        shown = "=" + _shorten(raw)
    else:
        shown = "" if value is None else "=" + _shorten(str(value))
    position = f"element [{inner[0]}]: " if inner and isinstance(inner[0], int) else ""
    origin = "" if where == "the environment" else f" (in {where})"
    return (
        f"{variable}{shown}{origin}: {position}{message[:1].lower()}{message[1:]}; "
        f"expected {expected_form(info)}."
    )


def _shorten(text: str) -> str:
    text = text if len(text) <= _VALUE_SHOWN_CHARS else text[: _VALUE_SHOWN_CHARS - 1] + "…"
    return repr(text)


def expected_form(info: Any) -> str:
    """How a value of this field is written, in words (with its bounds)."""
    annotation = _without_none(info.annotation)
    bounds = _bounds(info.metadata)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(annotation))
    if annotation is bool:
        return "true or false (also 1/0, yes/no, on/off)"
    if annotation is int:
        return "a whole number" + bounds
    if annotation is float:
        return "a number" + bounds
    if annotation is Path:
        return "a path (absolute, or starting with ~)"
    if annotation is SecretStr:
        return "a secret (text)"
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        examples = {int: "[123456789, 987654321]", Path: '["/path/one", "~/two"]'}
        names = {int: "whole numbers", Path: "paths", str: "strings"}
        example = examples.get(item, '["one", "two"]')
        return f"a JSON list of {names.get(item, 'values')}, e.g. {example}"
    if origin is dict:
        return 'a JSON object of names to strings, e.g. {"name": "value"}'
    return "text"


def _bounds(metadata: list[Any]) -> str:
    words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
    parts = [
        f"{phrase} {getattr(item, attr)}"
        for item in metadata
        for attr, phrase in words.items()
        if getattr(item, attr, None) is not None
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _is_json_type(annotation: Any) -> bool:
    return typing.get_origin(_without_none(annotation)) in (list, dict, set, tuple)


def _mentions(annotation: Any, kind: type) -> bool:
    """Whether ``kind`` appears in the annotation (``Path | None``, ``list[Path]`` …)."""
    if annotation is kind:
        return True
    return any(_mentions(arg, kind) for arg in typing.get_args(annotation))
