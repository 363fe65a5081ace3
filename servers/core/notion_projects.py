"""Project rows from Notion databases, and answers to questions about them.

Workspace names map to Notion database ids through ``VALOR_NOTION_WORKSPACES``. A database's
rows live in its data sources (Notion API 2025-09-03): each is queried with notion-client,
following ``next_cursor`` until ``has_more`` is false. notion-client's own retry loop handles 429
(honouring Retry-After, capped by ``VALOR_NOTION_MAX_RETRY_DELAY_SECONDS``) and 5xx on reads, up
to ``VALOR_NOTION_MAX_RETRIES`` times.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from servers.core.errors import Category, ValorError, describe_exception, redact
from servers.core.progress import Steps
from servers.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from notion_client import AsyncClient


class _RedactSecrets(logging.Filter):
    """notion-client logs Notion's error messages, which can quote the key back: redact them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


log = logging.getLogger("valor.notion")
log.addFilter(_RedactSecrets())

QUERY_STEPS = 2  # read the rows, answer
_TERM = re.compile(r"[^\W_]{3,}", re.UNICODE)
_QUESTION_WORDS = frozenset(
    """
    what which who whom whose when where why how are is was were the and for with that this
    these those there their our your any all show list tell give about have has does did
    project projects task tasks workspace status priority please can could would should
    """.split()  # noqa: SIM905 - a word list reads better as text
)


@dataclass
class ProjectRow:
    title: str
    status: str
    priority: str
    url: str
    last_edited: str

    def line(self) -> str:
        return f"- {self.title} | status: {self.status or '—'} | priority: {self.priority or '—'}"


def known_workspaces(settings: Settings | None = None) -> dict[str, str]:
    return dict((settings or get_settings()).notion_workspaces)


def resolve_workspace(name: str, settings: Settings | None = None) -> tuple[str, str]:
    """(canonical name, database id) for a workspace name, case-insensitively."""
    workspaces = known_workspaces(settings)
    if not workspaces:
        raise ValorError(
            Category.CONFIG,
            "No Notion workspaces are configured: set VALOR_NOTION_WORKSPACES to JSON like "
            '{"Valor": "<database id>"}.',
        )
    wanted = name.strip().casefold()
    for known, database_id in workspaces.items():
        if known.casefold() == wanted:
            return known, database_id
    names = ", ".join(sorted(workspaces))
    raise ValorError(Category.INPUT, f"Unknown workspace {name!r}. Known workspaces: {names}.")


def notion_client(settings: Settings | None = None) -> AsyncClient:
    from notion_client import AsyncClient
    from notion_client.client import ClientOptions, RetryOptions

    settings = settings or get_settings()
    key = settings.notion_api_key
    if key is None or not key.get_secret_value().strip():
        raise ValorError(Category.CONFIG, "Notion is not configured: set NOTION_API_KEY.")
    options = ClientOptions(
        auth=key.get_secret_value(),
        base_url=settings.notion_base_url.rstrip("/"),
        timeout_ms=int(settings.notion_timeout_seconds * 1000),
        logger=log,
        log_level=logging.WARNING,
        retry=RetryOptions(
            max_retries=settings.notion_max_retries,
            initial_retry_delay_ms=500,
            max_retry_delay_ms=int(settings.notion_max_retry_delay_seconds * 1000),
        ),
    )
    return AsyncClient(options)


def translate_error(exc: Exception) -> ValorError:
    import httpx
    from notion_client import APIResponseError
    from notion_client.errors import RequestTimeoutError

    if isinstance(exc, ValorError):
        return exc
    if isinstance(exc, RequestTimeoutError | httpx.TimeoutException):
        return ValorError(Category.TIMEOUT, "Notion did not answer in time; try again shortly.")
    if isinstance(exc, APIResponseError):
        code = str(getattr(exc.code, "value", exc.code))
        if code == "unauthorized":
            return ValorError(Category.CONFIG, "Notion rejected the API key: check NOTION_API_KEY.")
        if code in ("object_not_found", "restricted_resource"):
            return ValorError(
                Category.CONFIG,
                "Notion cannot find that database for this integration: check the id in "
                "VALOR_NOTION_WORKSPACES and share the database with the integration.",
            )
        if code == "rate_limited":
            value = exc.headers.get("retry-after") if exc.headers is not None else None
            retry_after = float(value) if value and value.replace(".", "", 1).isdigit() else None
            wait = f" Retry after {retry_after:g} s." if retry_after is not None else ""
            return ValorError(
                Category.RATE_LIMIT,
                f"Notion is rate limiting requests.{wait}",
                retry_after=retry_after,
            )
        if code in ("validation_error", "invalid_request", "invalid_request_url", "invalid_json"):
            return ValorError(Category.CONFIG, f"Notion refused the query ({code}): {exc}")
        return ValorError(Category.UPSTREAM, f"Notion failed ({code}); try again later.")
    if isinstance(exc, httpx.HTTPError):
        return ValorError(Category.UPSTREAM, "Notion could not be reached; check NOTION base URL.")
    if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
        log.warning("malformed reply from Notion: %s", describe_exception(exc))
        return ValorError(Category.UPSTREAM, "Notion sent a malformed reply; try again later.")
    raise exc


async def fetch_rows(
    database_id: str,
    settings: Settings | None = None,
    on_page: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[list[ProjectRow], bool]:
    """Every row of every data source of the database (up to the row cap); True if capped.
    ``on_page`` hears the number of rows read so far after each page."""
    settings = settings or get_settings()
    client = notion_client(settings)
    rows: list[ProjectRow] = []
    try:
        database = await client.databases.retrieve(database_id=database_id)
        sources = [source["id"] for source in database.get("data_sources") or []]
        if not sources:
            raise ValorError(Category.CONFIG, "That Notion database has no data sources to read.")
        for source_id in sources:
            cursor: str | None = None
            while True:
                arguments: dict[str, Any] = {"data_source_id": source_id, "page_size": 100}
                if cursor:
                    arguments["start_cursor"] = cursor
                page = await client.data_sources.query(**arguments)
                for item in page["results"]:
                    if item.get("object") == "page":
                        rows.append(parse_row(item))
                        if len(rows) >= settings.notion_max_rows:
                            return rows, True
                if on_page is not None:
                    await on_page(len(rows))
                cursor = page.get("next_cursor")
                if not page.get("has_more") or not cursor:
                    break
    except Exception as exc:
        raise translate_error(exc) from None
    finally:
        await client.aclose()
    return rows, False


def parse_row(page: dict[str, Any]) -> ProjectRow:
    """Title, status and priority, found by property type and name, whatever the schema."""
    properties: dict[str, Any] = page.get("properties") or {}
    title = status = priority = ""
    for name, prop in properties.items():
        kind = prop.get("type")
        lowered = name.lower()
        if kind == "title":
            title = "".join(part.get("plain_text", "") for part in prop.get("title") or [])
        elif kind == "status" and not status:
            status = (prop.get("status") or {}).get("name", "")
        elif kind == "select" and "status" in lowered and not status:
            status = (prop.get("select") or {}).get("name", "")
        elif kind in ("select", "status") and "priorit" in lowered:
            priority = (prop.get(kind) or {}).get("name", "")
    return ProjectRow(
        title=title.strip() or "(untitled)",
        status=status,
        priority=priority,
        url=str(page.get("url") or ""),
        last_edited=str(page.get("last_edited_time") or ""),
    )


def question_terms(question: str) -> list[str]:
    return [
        term
        for term in dict.fromkeys(t.casefold() for t in _TERM.findall(question))
        if term not in _QUESTION_WORDS
    ]


def filter_rows(rows: list[ProjectRow], question: str) -> tuple[list[ProjectRow], bool]:
    """Rows whose title, status or priority contains a term of the question, most terms first.

    Returns (rows, filtered): when no term matches anything, every row is returned unfiltered.
    """
    terms = question_terms(question)
    if not terms:
        return rows, False
    scored = []
    for index, row in enumerate(rows):
        haystack = f"{row.title} {row.status} {row.priority}".casefold()
        hits = sum(term in haystack for term in terms)
        if hits:
            scored.append((-hits, index, row))
    if not scored:
        return rows, False
    return [row for *_, row in sorted(scored)], True


ANSWER_PROMPT = (
    "You answer questions about a team's projects using only the Notion rows given. Be brief "
    "and concrete, name the projects you refer to, and say so if the rows do not answer it."
)


async def answer_with_model(workspace: str, question: str, rows: list[ProjectRow]) -> str:
    from servers.core import openai_services

    settings = get_settings()
    client = openai_services.client_for(openai_services.OPENAI, settings)
    listing = json.dumps([asdict(row) for row in rows], ensure_ascii=False)[:30_000]
    try:
        completion = await client.chat.completions.create(
            model=settings.openai_chat_model,
            messages=[
                {"role": "system", "content": ANSWER_PROMPT},
                {
                    "role": "user",
                    "content": f"Workspace: {workspace}\nRows (JSON): {listing}\n\n"
                    f"Question: {question}",
                },
            ],
            max_tokens=600,
        )
        answer = completion.choices[0].message.content
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("empty answer")
    except Exception as exc:
        raise openai_services.translate_error(exc, openai_services.OPENAI) from None
    finally:
        await client.close()
    return answer.strip()


async def query_projects(
    workspace: str, question: str, progress: Steps | None = None
) -> dict[str, Any]:
    """``progress`` (2 steps) hears each page of rows read and the model's answer start."""
    from servers.core.openai_services import openai_configured

    steps = progress or Steps(None, QUERY_STEPS)
    settings = get_settings()
    name, database_id = resolve_workspace(workspace, settings)
    pages = 0

    async def page_read(count: int) -> None:
        nonlocal pages
        pages += 1
        await steps.at(1 - 0.5**pages, f"read {count} rows of {name}")

    async with steps.waiting(f"reading the {name} database in Notion"):
        rows, capped = await fetch_rows(database_id, settings, on_page=page_read)
    matching, filtered = filter_rows(rows, question)
    answer, source, note = "", "listing", ""
    if capped:
        note = f"Only the first {settings.notion_max_rows} rows were read (VALOR_NOTION_MAX_ROWS)."
    if openai_configured(settings) and rows:
        await steps.at(1, "answering with the model")
        try:
            async with steps.waiting("answering with the model"):
                answer, source = await answer_with_model(name, question, rows), "model"
        except ValorError as exc:
            note = f"{note} The model could not answer ({exc}); the listing is below.".strip()
    if not answer:
        if not rows:
            answer = f"The {name} workspace has no rows."
        else:
            shown = matching if filtered else rows
            head = (
                f"{len(shown)} of {len(rows)} rows match the question"
                if filtered
                else f"No row matched the question's terms; all {len(rows)} rows"
            )
            answer = head + ":\n" + "\n".join(row.line() for row in shown)
    await steps.done(f"{len(rows)} rows read")
    return {
        "workspace": name,
        "question": question,
        "answer": answer,
        "answer_source": source,
        "total_rows": len(rows),
        "rows": [asdict(row) for row in (matching if filtered else rows)],
        "filtered": filtered,
        "note": note,
    }
