"""Valor settings: environment variables (prefix ``VALOR_``) and ``.env``.

Standard names users already have (``OPENAI_API_KEY`` …) are accepted as they are. Every external
base URL is a setting, which is also how the tests point the real SDKs at loopback fakes.
Secrets are ``SecretStr``: they never appear in reprs, logs or error text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servers.core.paths import default_data_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VALOR_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

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
    log_level: str = Field(default="INFO", description="Python logging level.")

    # --- trusted context (set by the launching process, never by the model) ---
    chat_id: int | None = Field(
        default=None,
        description="Chat this process serves; set by the bridge for the servers it launches.",
    )
    scope_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key for signed chat-scope tokens on HTTP-hosted servers.",
    )

    # --- hosting the servers over HTTP (daemon, bridge, `valor serve --all --http`) ---
    http_host: str = Field(default="127.0.0.1", description="Loopback address to host on.")
    http_port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port.")

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

    # --- model for summaries / analysis (OpenAI-compatible; Ollama by default for daydream) ---
    daydream_base_url: str = Field(default="http://127.0.0.1:11434/v1")
    daydream_model: str = Field(default="gemma3")
    daydream_timeout_seconds: float = Field(default=120.0, gt=0)

    # --- history tool bounds ---
    history_max_results: int = Field(default=50, ge=1, le=500)
    history_max_chars: int = Field(default=20_000, ge=1_000)

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "valor.db"

    @property
    def media_path(self) -> Path:
        return self.media_dir or self.data_dir / "media"

    @property
    def screenshots_path(self) -> Path:
        return self.screenshots_dir or self.data_dir / "screenshots"

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Tests change the environment; this makes the next get_settings() read it again."""
    get_settings.cache_clear()
