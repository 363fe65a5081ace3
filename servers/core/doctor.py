"""What works, what is broken and what is not configured, per capability (``valor doctor``).

``capability_report(settings)`` is the quick look (what is configured; the daemon's start-up
summary). ``diagnose(settings)`` checks each configured capability for real: a request to each
configured API with its key, ``claude --version``, ``chromium --version``, a bubblewrap sandbox
started once, ``PRAGMA quick_check`` on the store and its permissions, the Telegram session
decoded. Each result is ``ok``, ``off`` (not configured: fine) or ``broken`` (configured but not
working: ``valor doctor`` exits 1). Details never carry a secret (``errors.redact``).

Telegram is checked offline: a user session string must decode (Telethon ``StringSession``) to a
data centre and a 256-byte auth key, a bot token must have the ``<id>:<secret>`` shape. Whether
Telegram still accepts the session is only known when the bridge connects.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from servers.core.errors import ValorError, redact
from servers.core.settings import REPO_ROOT, Settings

OK, OFF, BROKEN = "ok", "off", "broken"
PROBE_TIMEOUT_SECONDS = 10.0  # one HTTP request to a configured API
COMMAND_TIMEOUT_SECONDS = 60.0  # `claude --version` starts node: slow on a busy machine
ANTHROPIC_VERSION = "2023-06-01"
NOTION_VERSION = "2022-06-28"
BOT_TOKEN = re.compile(r"^\d{3,}:[A-Za-z0-9_-]{30,}$")
TELEGRAM_AUTH_KEY_BYTES = 256


@dataclass(frozen=True)
class CapabilityStatus:
    capability: str
    state: str  # ok, off (not configured) or broken (configured, not working)
    detail: str

    @property
    def ready(self) -> bool:
        return self.state == OK

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ready": self.ready}


def _secret_set(value: object) -> bool:
    return value is not None and bool(value.get_secret_value())  # type: ignore[attr-defined]


def _status(capability: str, state: str, detail: str) -> CapabilityStatus:
    return CapabilityStatus(capability, state, redact(detail))


# -- the quick look: what is configured -----------------------------------------------------------
def capability_report(settings: Settings) -> list[CapabilityStatus]:
    """What is configured (no request, no process started)."""
    claude = settings.resolve_claude_bin()
    telegram = telegram_state(settings)
    return [
        _status("conversation history (telegram-tools)", OK, f"store at {settings.db_path}"),
        _configured(
            "web search (Perplexity)",
            _secret_set(settings.perplexity_api_key),
            "PERPLEXITY_API_KEY is set",
            "set PERPLEXITY_API_KEY to enable search_current_info",
        ),
        _configured(
            "images and vision (OpenAI)",
            _secret_set(settings.openai_api_key),
            "OPENAI_API_KEY is set",
            "set OPENAI_API_KEY to enable create_image and analyze_shared_image",
        ),
        _configured(
            "voice notes (transcription)",
            transcription_configured(settings),
            "transcription endpoint configured",
            TRANSCRIPTION_OFF,
        ),
        _configured(
            "Notion projects",
            _secret_set(settings.notion_api_key) and bool(settings.notion_workspaces),
            "NOTION_API_KEY and VALOR_NOTION_WORKSPACES are set",
            "set NOTION_API_KEY and VALOR_NOTION_WORKSPACES (JSON name -> database id)",
        ),
        _configured(
            "Claude Code CLI",
            claude is not None,
            claude or "",
            "not found: run `npm ci` in the repo (pinned) or set VALOR_CLAUDE_BIN",
        ),
        _status("Telegram bridge", *telegram),
    ]


def _configured(capability: str, ready: bool, yes: str, no: str) -> CapabilityStatus:
    return _status(capability, OK if ready else OFF, yes if ready else no)


def telegram_state(settings: Settings) -> tuple[str, str]:
    """Telegram's credentials checked offline: complete, decodable, or what is missing."""
    parts = {
        "TELEGRAM_API_ID": settings.telegram_api_id is not None,
        "TELEGRAM_API_HASH": _secret_set(settings.telegram_api_hash),
        "TELEGRAM_SESSION or TELEGRAM_BOT_TOKEN": _secret_set(settings.telegram_session)
        or _secret_set(settings.telegram_bot_token),
    }
    missing = [name for name, present in parts.items() if not present]
    if len(missing) == len(parts):
        return OFF, (
            "set TELEGRAM_API_ID, TELEGRAM_API_HASH and TELEGRAM_SESSION (from `valor "
            "login`) or TELEGRAM_BOT_TOKEN to run the bridge"
        )
    if missing:
        return BROKEN, f"partly configured: {', '.join(missing)} missing"
    if _secret_set(settings.telegram_session):
        problem = session_problem(settings.telegram_session.get_secret_value())  # type: ignore[union-attr]
        if problem:
            return BROKEN, f"TELEGRAM_SESSION {problem}; run `valor login` again"
        return OK, "user session decodes (data centre and auth key; checked offline)"
    token = settings.telegram_bot_token.get_secret_value()  # type: ignore[union-attr]
    if not BOT_TOKEN.match(token):
        return BROKEN, "TELEGRAM_BOT_TOKEN is not shaped <bot id>:<secret> (from @BotFather)"
    return OK, "bot token is well-formed (checked offline)"


def check_telegram_connection(settings: Settings) -> CapabilityStatus:
    """The running bridge's connection, as it last wrote it (``telegram/status.json``): broken
    when logged out or unreachable past VALOR_TELEGRAM_DOWN_ALERT_SECONDS."""
    from servers.core.health import transport_status
    from servers.core.model_results import human_duration

    name = "Telegram connection"
    if telegram_state(settings)[0] != OK:
        return _status(name, OFF, "Telegram is not configured")
    status = transport_status(settings.data_dir)
    if status is None:
        return _status(name, OFF, "no bridge has connected from this data directory yet")
    if status.logged_out:
        return _status(
            name, BROKEN, f"logged out ({status.last_error}); run `valor login` or check the token"
        )
    if status.connected:
        return _status(name, OK, f"connected since {status.changed_at}")
    if status.stopped:
        return _status(name, OK, f"the bridge is not running (stopped at {status.changed_at})")
    down = status.down_seconds or 0.0
    detail = f"unreachable for {human_duration(down)}, reconnecting: {status.last_error}"
    return _status(name, BROKEN if down >= settings.telegram_down_alert_seconds else OK, detail)


def session_problem(session: str) -> str | None:
    """Why a Telethon StringSession cannot be used, or None when it holds an auth key."""
    from telethon.sessions import StringSession

    try:
        loaded = StringSession(session.strip())
    except Exception:  # Telethon raises ValueError, binascii.Error or struct.error
        return "does not decode as a Telethon session string"
    key = getattr(loaded.auth_key, "key", None)
    if not loaded.dc_id or not key or len(key) != TELEGRAM_AUTH_KEY_BYTES:
        return "holds no auth key (it was never logged in)"
    return None


# -- the real checks ------------------------------------------------------------------------------
def diagnose(settings: Settings) -> list[CapabilityStatus]:
    """Every capability, each configured one exercised for real."""
    checks: list[Callable[[Settings], CapabilityStatus]] = [
        check_store,
        check_claude_code,
        check_anthropic,
        check_sandbox,
        lambda s: _status("Telegram bridge", *telegram_state(s)),
        check_telegram_connection,
        check_daydream_model,
        check_openai,
        check_transcription,
        check_perplexity,
        check_notion,
        check_chromium,
    ]
    report = []
    for check in checks:
        try:
            report.append(check(settings))
        except ValorError as exc:  # a check's own config refusal is its answer
            report.append(_status(getattr(check, "__name__", "check"), BROKEN, str(exc)))
    return report


def report_json(report: list[CapabilityStatus]) -> str:
    return json.dumps(
        {"ok": not any(i.state == BROKEN for i in report), "checks": [i.as_dict() for i in report]},
        indent=2,
    )


def check_store(settings: Settings) -> CapabilityStatus:
    name = "store (history, promises, tokens)"
    data_dir, db = Path(settings.data_dir), settings.db_path
    if not data_dir.exists():
        return _status(name, OFF, f"{data_dir} does not exist yet (created on first use)")
    loose = [
        f"{path} is mode {stat.S_IMODE(path.stat().st_mode):o} (others can read it)"
        for path in (data_dir, db)
        if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077
    ]
    foreign = [
        f"{path} belongs to uid {path.stat().st_uid}"
        for path in (data_dir, db)
        if path.exists() and path.stat().st_uid != os.getuid()
    ]
    if not db.exists():
        state = BROKEN if loose or foreign else OFF
        return _status(name, state, "; ".join(loose + foreign) or f"{db} not created yet")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            result = [row[0] for row in conn.execute("PRAGMA quick_check")]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return _status(name, BROKEN, f"{db} cannot be read: {exc}")
    if result != ["ok"]:
        return _status(name, BROKEN, f"{db} failed PRAGMA quick_check: {'; '.join(result[:3])}")
    if loose or foreign:
        return _status(name, BROKEN, "; ".join(loose + foreign) + " (chmod 700 / 600)")
    return _status(name, OK, f"{db}: quick_check ok, schema {version}, owner-only")


def check_claude_code(settings: Settings) -> CapabilityStatus:
    name = "Claude Code CLI"
    claude = settings.resolve_claude_bin()
    if claude is None:
        return _status(
            name, OFF, "not found: run `npm ci` in the repo (pinned) or set VALOR_CLAUDE_BIN"
        )
    ran = _run([claude, "--version"])
    if isinstance(ran, _Failure):
        return _status(name, BROKEN, f"{claude}: {ran}")
    version = ran.split()[0] if ran.split() else "?"
    pinned = pinned_claude_version()
    note = "" if pinned in (None, version) else f"; the repository pins {pinned} (`npm ci`)"
    return _status(name, OK, f"{claude}: version {version}{note}")


def pinned_claude_version() -> str | None:
    try:
        package = json.loads((REPO_ROOT / "package.json").read_text(encoding="utf-8"))
        return package["dependencies"]["@anthropic-ai/claude-code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_anthropic(settings: Settings) -> CapabilityStatus:
    """The model API Claude Code runs use: a key the API accepts, or a base URL that answers."""
    name = "Anthropic API (Claude Code runs)"
    base = (settings.anthropic_base_url or "https://api.anthropic.com").rstrip("/")
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if _secret_set(settings.anthropic_api_key):
        headers["x-api-key"] = settings.anthropic_api_key.get_secret_value()  # type: ignore[union-attr]
        credential = "ANTHROPIC_API_KEY"
    elif token := os.environ.get("CLAUDE_CODE_OAUTH_TOKEN") or os.environ.get(
        "ANTHROPIC_AUTH_TOKEN"
    ):
        headers["authorization"] = f"Bearer {token}"
        credential = "the OAuth token"
    elif settings.anthropic_base_url:
        credential = ""
    else:
        return _status(
            name,
            OFF,
            "set ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN from "
            "`claude setup-token`): sandboxed runs never use your ~/.claude login",
        )
    status, problem = http_get(f"{base}/v1/models", headers)
    if status is None:
        return _status(name, BROKEN, f"cannot reach {base}: {problem}")
    if credential and status in (401, 403):
        return _status(name, BROKEN, f"{base} refused {credential} (HTTP {status})")
    if credential and status >= 400:
        return _status(name, BROKEN, f"{base} answered HTTP {status}")
    if not credential:
        return _status(name, OK, f"{base} answers (HTTP {status}); no key is configured")
    return _status(name, OK, f"{base} accepted {credential}")


def check_sandbox(settings: Settings) -> CapabilityStatus:
    from servers.core import sandbox

    name = "sandbox (bubblewrap)"
    if not sandbox.enabled(settings):
        return _status(name, OFF, "VALOR_SANDBOX=off: Claude Code runs are NOT sandboxed")
    try:
        bwrap = sandbox.resolve_bwrap(settings)
    except ValorError as exc:
        return _status(name, BROKEN, str(exc))
    ran = _run(sandbox.bwrap_argv(bwrap, [], Path("/"), ["true"]))
    if isinstance(ran, _Failure):
        return _status(name, BROKEN, f"{bwrap} cannot start a sandbox: {ran}")
    return _status(name, OK, f"{bwrap} starts a sandbox (namespaces, no capabilities)")


def check_daydream_model(settings: Settings) -> CapabilityStatus:
    name = "daydream model"
    base = settings.daydream_base_url.rstrip("/")
    explicit = {"daydream_base_url", "daydream_model", "daydream_api_key"} & (
        settings.model_fields_set
    )
    headers = {}
    if _secret_set(settings.daydream_api_key):
        headers["authorization"] = f"Bearer {settings.daydream_api_key.get_secret_value()}"  # type: ignore[union-attr]
    status, problem = http_get(f"{base}/models", headers)
    if status is None:
        state = BROKEN if explicit else OFF
        return _status(
            name,
            state,
            f"nothing answers at {base} ({problem}); start Ollama and "
            f"`ollama pull {settings.daydream_model}`, or set VALOR_DAYDREAM_BASE_URL",
        )
    if status >= 400:
        return _status(name, BROKEN, f"{base}/models answered HTTP {status}")
    models = _model_names(problem)
    if models is not None and not _has_model(models, settings.daydream_model):
        return _status(
            name,
            BROKEN,
            f"{base} has no model {settings.daydream_model!r} "
            f"(it has {', '.join(sorted(models)[:8]) or 'none'})",
        )
    return _status(name, OK, f"{base} serves {settings.daydream_model}")


def check_openai(settings: Settings) -> CapabilityStatus:
    name = "images and vision (OpenAI)"
    if not _secret_set(settings.openai_api_key):
        return _status(
            name, OFF, "set OPENAI_API_KEY to enable create_image and analyze_shared_image"
        )
    key = settings.openai_api_key.get_secret_value()  # type: ignore[union-attr]
    return _api_check(
        name,
        f"{settings.openai_base_url.rstrip('/')}/models",
        {"authorization": f"Bearer {key}"},
        "OPENAI_API_KEY",
    )


TRANSCRIPTION_OFF = (
    "set OPENAI_API_KEY, or VALOR_TRANSCRIPTION_BASE_URL for a local Whisper-compatible server, "
    "to transcribe voice notes"
)


def transcription_configured(settings: Settings) -> bool:
    """As servers.core.transcription decides it (not imported: it loads the OpenAI layer)."""
    return bool(
        settings.transcription_base_url
        or _secret_set(settings.transcription_api_key)
        or _secret_set(settings.openai_api_key)
    )


def check_transcription(settings: Settings) -> CapabilityStatus:
    """The endpoint's model list (free): reachable, and the key accepted. A local server that
    does not list models (404) is reachable, which is what can be known without audio."""
    name = "voice notes (transcription)"
    if not transcription_configured(settings):
        return _status(name, OFF, TRANSCRIPTION_OFF)
    base = settings.transcription_base_url or settings.openai_base_url
    key = settings.transcription_api_key or settings.openai_api_key
    headers = {"authorization": f"Bearer {key.get_secret_value()}"} if _secret_set(key) else {}
    url = f"{base.rstrip('/')}/models"
    reachable = f"{url} reachable; model {settings.transcription_model}"
    return _api_check(name, url, headers, "the key", broken_from=500, ok_detail=reachable)


def check_perplexity(settings: Settings) -> CapabilityStatus:
    name = "web search (Perplexity)"
    if not _secret_set(settings.perplexity_api_key):
        return _status(name, OFF, "set PERPLEXITY_API_KEY to enable search_current_info")
    # Perplexity has no free endpoint to try a key on; a search costs money.
    return _status(name, OK, "PERPLEXITY_API_KEY is set (not tried: every request is billed)")


def check_notion(settings: Settings) -> CapabilityStatus:
    name = "Notion projects"
    if not _secret_set(settings.notion_api_key):
        return _status(
            name, OFF, "set NOTION_API_KEY and VALOR_NOTION_WORKSPACES (JSON name -> database id)"
        )
    if not settings.notion_workspaces:
        return _status(name, BROKEN, "NOTION_API_KEY is set but VALOR_NOTION_WORKSPACES is empty")
    key = settings.notion_api_key.get_secret_value()  # type: ignore[union-attr]
    headers = {"authorization": f"Bearer {key}", "notion-version": NOTION_VERSION}
    url = f"{settings.notion_base_url.rstrip('/')}/v1/users/me"
    return _api_check(name, url, headers, "NOTION_API_KEY")


def check_chromium(settings: Settings) -> CapabilityStatus:
    from servers.core.browser_capture import chromium_executable

    name = "screenshots (Chromium)"
    try:
        chromium = chromium_executable(settings)
    except ValorError as exc:
        state = BROKEN if settings.browser_executable is not None else OFF
        return _status(name, state, str(exc))
    ran = _run([chromium, "--headless", "--version"])
    if isinstance(ran, _Failure):
        return _status(name, BROKEN, f"{chromium}: {ran}")
    return _status(name, OK, f"{chromium}: {ran.strip()}")


# -- helpers --------------------------------------------------------------------------------------
def _api_check(
    name: str,
    url: str,
    headers: dict[str, str],
    credential: str,
    *,
    broken_from: int = 400,
    ok_detail: str | None = None,
) -> CapabilityStatus:
    """One GET: unreachable, 401/403 or a status from ``broken_from`` up is broken."""
    status, problem = http_get(url, headers)
    if status is None:
        return _status(name, BROKEN, f"cannot reach {url}: {problem}")
    if status in (401, 403):
        return _status(name, BROKEN, f"{url} refused {credential} (HTTP {status})")
    if status >= broken_from:
        return _status(name, BROKEN, f"{url} answered HTTP {status}")
    return _status(name, OK, ok_detail or f"{credential} accepted by {url}")


def http_get(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
    """(status, body) of one GET, or (None, why it failed)."""
    import httpx

    try:
        response = httpx.get(url, headers=headers, timeout=PROBE_TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__ + (f": {exc}" if str(exc) else "")
    except ValueError as exc:  # not a URL
        return None, str(exc)
    return response.status_code, response.text[:200_000]


def _model_names(body: str) -> set[str] | None:
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return {str(item.get("id")) for item in data if isinstance(item, dict)}


def _has_model(models: set[str], wanted: str) -> bool:
    """Ollama lists ``gemma3:latest`` for ``gemma3``."""
    return wanted in models or f"{wanted}:latest" in models


def _run(argv: list[str]) -> str:
    """A command's output; on failure a ``_Failure`` saying why."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _Failure(f"no answer within {COMMAND_TIMEOUT_SECONDS:.0f} s")
    except OSError as exc:
        return _Failure(exc.strerror or str(exc))
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return _Failure(f"exit code {done.returncode}: {last[0][:300]}")
    return done.stdout or done.stderr


class _Failure(str):
    """A failed command's description (a str, told apart from output by its type)."""
