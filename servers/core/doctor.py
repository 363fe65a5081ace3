"""What is configured and what is missing, per capability (``valor doctor``, daemon start-up)."""

from __future__ import annotations

from dataclasses import dataclass

from servers.core.settings import Settings


@dataclass(frozen=True)
class CapabilityStatus:
    capability: str
    ready: bool
    detail: str


def _secret_set(value: object) -> bool:
    return value is not None and bool(value.get_secret_value())  # type: ignore[attr-defined]


def capability_report(settings: Settings) -> list[CapabilityStatus]:
    claude = settings.resolve_claude_bin()
    telegram_ready = (
        settings.telegram_api_id is not None
        and _secret_set(settings.telegram_api_hash)
        and (_secret_set(settings.telegram_session) or _secret_set(settings.telegram_bot_token))
    )
    report = [
        CapabilityStatus(
            "conversation history (telegram-tools)",
            True,
            f"store at {settings.db_path}",
        ),
        CapabilityStatus(
            "web search (Perplexity)",
            _secret_set(settings.perplexity_api_key),
            "PERPLEXITY_API_KEY is set"
            if _secret_set(settings.perplexity_api_key)
            else "set PERPLEXITY_API_KEY to enable search_current_info",
        ),
        CapabilityStatus(
            "images and vision (OpenAI)",
            _secret_set(settings.openai_api_key),
            "OPENAI_API_KEY is set"
            if _secret_set(settings.openai_api_key)
            else "set OPENAI_API_KEY to enable create_image and analyze_shared_image",
        ),
        CapabilityStatus(
            "Notion projects",
            _secret_set(settings.notion_api_key) and bool(settings.notion_workspaces),
            "NOTION_API_KEY and VALOR_NOTION_WORKSPACES are set"
            if _secret_set(settings.notion_api_key) and settings.notion_workspaces
            else "set NOTION_API_KEY and VALOR_NOTION_WORKSPACES (JSON name -> database id)",
        ),
        CapabilityStatus(
            "Claude Code CLI",
            claude is not None,
            claude or "not found: run `npm ci` in the repo (pinned) or set VALOR_CLAUDE_BIN",
        ),
        CapabilityStatus(
            "Telegram bridge",
            telegram_ready,
            "Telegram credentials are set"
            if telegram_ready
            else "set TELEGRAM_API_ID, TELEGRAM_API_HASH and TELEGRAM_SESSION (from `valor "
            "login`) or TELEGRAM_BOT_TOKEN to run the bridge",
        ),
    ]
    return report
