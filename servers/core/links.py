"""Saved links: fetch (through the SSRF guard), extract, summarize, store and search.

Article extraction is trafilatura's (imported when a page is saved: it is slow to import).
Summaries come from the configured OpenAI chat model when ``OPENAI_API_KEY`` is set, otherwise
from the page itself (its description or first sentences); when the model fails the link is still
saved with the extractive summary and a note saying why. The same URL saved again in the same
chat updates its row (``UNIQUE (chat_key, url)``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from servers.core import http_guard
from servers.core.errors import Category, ValorError, input_error
from servers.core.history import fts_query, iso, to_fts_query
from servers.core.progress import Steps
from servers.core.store import Store, now

if TYPE_CHECKING:
    import httpx

MAX_URL_LENGTH = 2048
SAVE_LINK_STEPS = 3  # fetch, extract, summarize
SUMMARY_CHARS = 500
TAG_SEPARATOR = ", "
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)
_STOPWORDS = frozenset(
    """
    about above after again against also because been before being below between both could
    does doing down during each from further have having here how into itself just more most
    much other over same should some such than that their them then there these they this those
    through under until very what when where which while will with would your yours only were
    said says like also into many make made well even back still ours within without
    """.split()  # noqa: SIM905 - a word list reads better as text
)


@dataclass
class Article:
    title: str
    text: str
    description: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class SavedLink:
    id: int
    url: str
    final_url: str
    chat_id: int | None
    title: str
    summary: str
    tags: list[str]
    summary_source: str  # "model" or "extractive"
    created: bool  # False when an earlier save of the same URL was updated
    saved_at: str
    note: str = ""


def chat_key(chat_id: int | None) -> str:
    return "none" if chat_id is None else f"c{int(chat_id)}"


def normalize_url(url: str) -> str:
    """One spelling per page: lower-case scheme and host, no fragment, no surrounding space."""
    import httpx

    text = (url or "").strip()
    if not text:
        raise input_error("url is empty: pass the link to save.")
    if len(text) > MAX_URL_LENGTH:
        raise input_error(f"The link is longer than {MAX_URL_LENGTH} characters.")
    try:
        parsed = httpx.URL(text)
        # The host is decoded from IDNA (xn--…) only when read; a bad one raises there.
        normalized = str(parsed.copy_with(fragment=None)) if parsed.host is not None else ""
    except UnicodeError as exc:  # idna.IDNAError and its kinds
        raise input_error(
            f"The link's host name is not a valid internationalized domain name ({exc})."
        ) from None
    except (httpx.InvalidURL, ValueError) as exc:
        raise input_error(f"That is not a valid URL ({exc}).") from None
    if parsed.scheme not in ("http", "https"):
        shown = parsed.scheme or "no scheme"
        raise input_error(f"Only http and https links can be saved, not {shown}.")
    return normalized


def extract_article(html: str, url: str) -> Article:
    """Title, main text, description and tags of a page, by trafilatura."""
    import trafilatura

    document = trafilatura.bare_extraction(
        html, url=url, with_metadata=True, include_comments=False, include_tables=False
    )
    if document is None:
        metadata = trafilatura.extract_metadata(html, default_url=url)
        title = (metadata.title if metadata else None) or ""
        description = (metadata.description if metadata else None) or ""
        return Article(title=title, text="", description=description)
    tags: list[str] = []
    for group in (document.tags or [], document.categories or []):
        for item in group:
            tags += [part.strip() for part in str(item).split(",") if part.strip()]
    return Article(
        title=(document.title or "").strip(),
        text=(document.text or "").strip(),
        description=(document.description or "").strip(),
        tags=list(dict.fromkeys(tags)),
    )


def extractive_summary(article: Article, limit: int = SUMMARY_CHARS) -> str:
    """The page's own description, else its first sentences, within limit characters."""
    if len(article.description) >= 40:
        return _clip(article.description, limit)
    body = article.text
    if body.startswith(article.title):  # extractors often repeat the headline as line one
        body = body[len(article.title) :]
    summary = ""
    for sentence in _SENTENCE_END.split(" ".join(body.split())):
        if len(summary) + len(sentence) + 1 > limit:
            break
        summary = f"{summary} {sentence}".strip()
    return summary or _clip(" ".join(body.split()) or article.description, limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def keyword_tags(article: Article, count: int = 5) -> list[str]:
    """The page's declared tags, topped up with its most frequent content words."""
    tags = [tag.lower() for tag in article.tags][:count]
    words = Counter(
        word
        for word in (w.lower() for w in _WORD.findall(f"{article.title} {article.text}"))
        if word not in _STOPWORDS
    )
    for word, _ in words.most_common():
        if len(tags) >= count:
            break
        if word not in tags:
            tags.append(word)
    return tags


async def save_link(
    store: Store,
    url: str,
    chat_id: int | None,
    *,
    resolver: http_guard.Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    use_model: bool | None = None,
    progress: Steps | None = None,
) -> SavedLink:
    """Fetch, extract, summarize and store one link (an update if it was saved before).
    ``progress`` (3 steps) hears the fetch, the extraction and the summary start."""
    import anyio

    from servers.core import openai_services

    steps = progress or Steps(None, SAVE_LINK_STEPS)
    normalized = normalize_url(url)
    async with steps.waiting("fetching the page"):
        page = await http_guard.fetch(normalized, resolver=resolver, transport=transport)
    await steps.at(1, "extracting the article")
    if page.content_type == "text/plain":
        text = page.text.strip()
        article = Article(title=text.splitlines()[0][:200] if text else "", text=text)
    else:
        article = await anyio.to_thread.run_sync(extract_article, page.text, page.url)
    if not article.title:
        article.title = page.url
    if not article.text and not article.description:
        raise ValorError(
            Category.ENCODING,
            "The page has no readable article text (it may need JavaScript or a login); "
            "nothing was saved.",
        )

    summary, tags, source, note = (
        extractive_summary(article),
        keyword_tags(article),
        "extractive",
        "",
    )
    if use_model if use_model is not None else openai_services.openai_configured():
        await steps.at(2, "summarizing with the model")
        try:
            async with steps.waiting("summarizing with the model"):
                summary, model_tags = await openai_services.summarize(
                    article.title, article.text or article.description
                )
            tags = [tag.replace(",", " ") for tag in model_tags] or tags
            source = "model"
        except ValorError as exc:
            note = f"Model summary failed, page summary used instead: {exc}"
    saved = _upsert(
        store, normalized, page.url, chat_id, article.title, summary, tags, source, note
    )
    await steps.done("saved")
    return saved


def _upsert(
    store: Store,
    url: str,
    final_url: str,
    chat_id: int | None,
    title: str,
    summary: str,
    tags: list[str],
    source: str,
    note: str,
) -> SavedLink:
    stamp = now()
    with store.transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO links (url, final_url, chat_id, chat_key, title, summary, tags,
                               summary_source, saved_at, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_key, url) DO UPDATE SET
                final_url = excluded.final_url, title = excluded.title,
                summary = excluded.summary, tags = excluded.tags,
                summary_source = excluded.summary_source, updated_at = excluded.updated_at
            RETURNING id, saved_at
            """,
            (
                url,
                final_url,
                chat_id,
                chat_key(chat_id),
                title,
                summary,
                TAG_SEPARATOR.join(tags),
                source,
                stamp,
                stamp,
            ),
        ).fetchone()
    return SavedLink(
        id=row["id"],
        url=url,
        final_url=final_url,
        chat_id=chat_id,
        title=title,
        summary=summary,
        tags=tags,
        summary_source=source,
        created=row["saved_at"] == stamp,
        saved_at=iso(row["saved_at"]),
        note=note,
    )


def search_links(
    store: Store, query: str, chat_id: int | None, *, all_chats: bool, max_results: int = 10
) -> list[dict[str, Any]]:
    """Full-text search over title, summary, tags and URL, best first.

    With all_chats False only links of chat_id (or the operator's own, when chat_id is None).
    """
    match = f"{{title summary tags url}}:({to_fts_query(query)})"
    where, params = "links_fts MATCH ?", [match]
    if not all_chats:
        key = chat_key(chat_id)
        params = [f'chat_key:"{key}" AND {match}']
        where += " AND l.chat_key = ?"
        params.append(key)
    rows = fts_query(
        store,
        f"""
        SELECT l.url, l.final_url, l.chat_id, l.title, l.summary, l.tags, l.saved_at,
               l.updated_at, snippet(links_fts, -1, '[', ']', '…', 16) AS snippet,
               bm25(links_fts, 4.0, 2.0, 3.0, 1.0, 0.0) AS rank
        FROM links_fts JOIN links l ON l.id = links_fts.rowid
        WHERE {where}
        ORDER BY rank LIMIT ?
        """,  # noqa: S608 - where is one of two fixed strings; values are parameters
        (*params, int(max_results)),
    )
    return [
        {
            "url": row["url"],
            "final_url": row["final_url"],
            "chat_id": row["chat_id"],
            "title": row["title"],
            "summary": row["summary"],
            "tags": [tag for tag in row["tags"].split(TAG_SEPARATOR) if tag],
            "saved_at": iso(row["saved_at"]),
            "updated_at": iso(row["updated_at"]),
            "snippet": row["snippet"],
            "score": round(-row["rank"], 4),
        }
        for row in rows
    ]
