"""Fake Notion API in the wire format of notion-client 3.x (Notion-Version 2025-09-03).

Databases hold data sources; rows are pages queried through
`POST /v1/data_sources/{id}/query`. The pre-2025 `POST /v1/databases/{id}/query` works too.
"""

from __future__ import annotations

import uuid
from typing import Any

from .base import FakeService, RecordedRequest

CREATED = "2025-01-01T00:00:00.000Z"
DATA_SOURCES_VERSION = "2025-09-03"
STATUS_OPTIONS = ["Not started", "In progress", "Done"]
PRIORITY_OPTIONS = ["High", "Medium", "Low"]


def rich_text(text: str) -> list[dict[str, Any]]:
    annotations = dict.fromkeys(("bold", "italic", "strikethrough", "underline", "code"), False)
    return [
        {
            "type": "text",
            "text": {"content": text, "link": None},
            "annotations": {**annotations, "color": "default"},
            "plain_text": text,
            "href": None,
        }
    ]


def _key(object_id: str) -> str:
    return object_id.replace("-", "").lower()


def _option(name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    return {
        "id": _key(str(uuid.uuid5(uuid.NAMESPACE_OID, name)))[:8],
        "name": name,
        "color": "default",
    }


def _schema() -> dict[str, Any]:
    def options(names: list[str]) -> list[dict[str, Any]]:
        return [_option(name) for name in names]

    return {
        "Name": {"id": "title", "name": "Name", "type": "title", "title": {}},
        "Status": {
            "id": "stat",
            "name": "Status",
            "type": "status",
            "status": {"options": options(STATUS_OPTIONS), "groups": []},
        },
        "Priority": {
            "id": "prio",
            "name": "Priority",
            "type": "select",
            "select": {"options": options(PRIORITY_OPTIONS)},
        },
        "URL": {"id": "url", "name": "URL", "type": "url", "url": {}},
    }


def _value(prop: dict[str, Any]) -> str | None:
    """A property's value as plain text, for filters and sorts."""
    kind = prop["type"]
    if kind in ("title", "rich_text"):
        return "".join(part["plain_text"] for part in prop[kind]) or None
    if kind in ("status", "select"):
        return prop[kind]["name"] if prop[kind] else None
    return prop.get(kind)


def _matches(page: dict[str, Any], condition: dict[str, Any] | None) -> bool:
    """Single-property conditions combined with and/or: enough for project queries."""
    if not condition:
        return True
    if "and" in condition:
        return all(_matches(page, c) for c in condition["and"])
    if "or" in condition:
        return any(_matches(page, c) for c in condition["or"])
    prop = page["properties"].get(condition.get("property"))
    if prop is None:
        return False
    value = _value(prop)
    test = next(v for k, v in condition.items() if k not in ("property", "type"))
    if "equals" in test:
        return value == test["equals"]
    if "does_not_equal" in test:
        return value != test["does_not_equal"]
    if "contains" in test:
        return value is not None and test["contains"].lower() in value.lower()
    if test.get("is_empty"):
        return value is None
    if test.get("is_not_empty"):
        return value is not None
    return True


class FakeNotion(FakeService):
    def __init__(self, required_api_key: str | None = None) -> None:
        super().__init__(required_api_key)
        self.page_size = 100  # the server-side cap; lower it to force pagination
        self.databases: dict[str, dict[str, Any]] = {}
        self.data_sources: dict[str, dict[str, Any]] = {}
        self.pages: dict[str, dict[str, Any]] = {}
        self.route("GET", r"/v1/databases/(?P<object_id>[\w-]+)", self._get_database)
        self.route("GET", r"/v1/data_sources/(?P<object_id>[\w-]+)", self._get_data_source)
        self.route("POST", r"/v1/data_sources/(?P<object_id>[\w-]+)/query", self._query)
        self.route("POST", r"/v1/databases/(?P<object_id>[\w-]+)/query", self._legacy_query)
        self.route("GET", r"/v1/pages/(?P<object_id>[\w-]+)", self._get_page)
        self.route("POST", r"/v1/search", self._search)
        self.route("GET", r"/v1/users/me", self._me)

    def error_body(self, status: int, message: str) -> Any:
        code = {
            400: "validation_error",
            401: "unauthorized",
            403: "restricted_resource",
            404: "object_not_found",
            409: "conflict_error",
            429: "rate_limited",
            503: "service_unavailable",
        }.get(status, "internal_server_error")
        request_id = str(uuid.uuid4())
        return {
            "object": "error",
            "status": status,
            "code": code,
            "message": message,
            "request_id": request_id,
        }

    # -- setup -------------------------------------------------------------------------------
    def add_database(
        self, database_id: str, rows: list[dict[str, Any]], title: str = "Projects"
    ) -> str:
        """Add a database whose one data source holds `rows`; returns the data source id.

        A row is {"title": str, "status": str?, "priority": str?, "url": str?, "id": str?};
        they become the Name (title), Status (status), Priority (select) and URL (url) properties.
        """
        data_source_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"data-source:{database_id}"))
        name = rich_text(title)
        self.databases[_key(database_id)] = {
            "object": "database",
            "id": database_id,
            "title": name,
            "description": [],
            "parent": {"type": "workspace", "workspace": True},
            "is_inline": False,
            "in_trash": False,
            "created_time": CREATED,
            "last_edited_time": CREATED,
            "data_sources": [{"id": data_source_id, "name": title}],
            "icon": None,
            "cover": None,
            "url": f"https://www.notion.so/{_key(database_id)}",
            "public_url": None,
        }
        self.data_sources[_key(data_source_id)] = {
            "object": "data_source",
            "id": data_source_id,
            "title": name,
            "description": [],
            "parent": {"type": "database_id", "database_id": database_id},
            "database_parent": {"type": "workspace", "workspace": True},
            "properties": _schema(),
            "created_time": CREATED,
            "last_edited_time": CREATED,
            "rows": [self._add_page(row, database_id, data_source_id) for row in rows],
        }
        return data_source_id

    def _add_page(self, row: dict[str, Any], database_id: str, data_source_id: str) -> str:
        page_id = row.get("id") or str(uuid.uuid4())
        title = row.get("title", "")
        properties = {
            "Name": {"id": "title", "type": "title", "title": rich_text(title)},
            "Status": {"id": "stat", "type": "status", "status": _option(row.get("status"))},
            "Priority": {"id": "prio", "type": "select", "select": _option(row.get("priority"))},
            "URL": {"id": "url", "type": "url", "url": row.get("url")},
        }
        user = {"object": "user", "id": "00000000-0000-0000-0000-000000000001"}
        slug = "-".join(title.split())
        self.pages[_key(page_id)] = {
            "object": "page",
            "id": page_id,
            "created_time": CREATED,
            "last_edited_time": CREATED,
            "created_by": user,
            "last_edited_by": user,
            "cover": None,
            "icon": None,
            "parent": {
                "type": "data_source_id",
                "data_source_id": data_source_id,
                "database_id": database_id,
            },
            "archived": False,
            "in_trash": False,
            "is_locked": False,
            "properties": properties,
            "url": f"https://www.notion.so/{slug}-{_key(page_id)}".replace("/-", "/"),
            "public_url": None,
        }
        return _key(page_id)

    # -- handlers ----------------------------------------------------------------------------
    def _not_found(self, kind: str, object_id: str):
        return self.error(
            404,
            f"Could not find {kind} with ID: {object_id}. "
            "Make sure the relevant pages and databases are shared with your integration.",
        )

    def _get_database(self, request: RecordedRequest, object_id: str):
        database = self.databases.get(_key(object_id))
        if database is None:
            return self._not_found("database", object_id)
        if request.headers.get("notion-version", "") < DATA_SOURCES_VERSION:
            return {**database, "properties": _schema()}  # the pre-data-source shape
        return database

    def _get_data_source(self, request: RecordedRequest, object_id: str):
        source = self.data_sources.get(_key(object_id))
        if source is None:
            return self._not_found("data_source", object_id)
        return {k: v for k, v in source.items() if k != "rows"}

    def _query(self, request: RecordedRequest, object_id: str):
        source = self.data_sources.get(_key(object_id))
        if source is None:
            return self._not_found("data_source", object_id)
        return self._page_of(request, source["rows"], "page_or_data_source")

    def _legacy_query(self, request: RecordedRequest, object_id: str):
        database = self.databases.get(_key(object_id))
        if database is None:
            return self._not_found("database", object_id)
        source = self.data_sources[_key(database["data_sources"][0]["id"])]
        return self._page_of(request, source["rows"], "page_or_database")

    def _page_of(self, request: RecordedRequest, row_keys: list[str], kind: str):
        body = request.json() or {}
        pages = [
            self.pages[key] for key in row_keys if _matches(self.pages[key], body.get("filter"))
        ]
        for sort in reversed(body.get("sorts") or []):  # stable sorts: last key first
            name = sort.get("property")
            pages.sort(
                key=lambda page, name=name: _value(page["properties"][name]) or "",
                reverse=sort.get("direction") == "descending",
            )
        return self._paginate(body, pages, kind)

    def _paginate(self, body: dict[str, Any], results: list[dict[str, Any]], kind: str):
        start = 0
        if cursor := body.get("start_cursor"):
            ids = [_key(item["id"]) for item in results]
            if _key(cursor) not in ids:
                return self.error(400, f"start_cursor provided is invalid: {cursor}")
            start = ids.index(_key(cursor))
        size = min(int(body.get("page_size") or 100), self.page_size)
        chunk, rest = results[start : start + size], results[start + size :]
        return {
            "object": "list",
            "results": chunk,
            "next_cursor": rest[0]["id"] if rest else None,
            "has_more": bool(rest),
            "type": kind,
            kind: {},
            "request_id": str(uuid.uuid4()),
        }

    def _get_page(self, request: RecordedRequest, object_id: str):
        page = self.pages.get(_key(object_id))
        return page if page is not None else self._not_found("page", object_id)

    def _search(self, request: RecordedRequest):
        body = request.json() or {}
        query = (body.get("query") or "").lower()
        sources = [{k: v for k, v in s.items() if k != "rows"} for s in self.data_sources.values()]
        found = [
            item
            for item in [*self.pages.values(), *sources]
            if query in "".join(part["plain_text"] for part in _title_of(item)).lower()
        ]
        wanted = (body.get("filter") or {}).get("value")
        found = [item for item in found if wanted in (None, item["object"])]
        return self._paginate(body, found, "page_or_data_source")

    def _me(self, request: RecordedRequest):
        return {
            "object": "user",
            "id": "00000000-0000-0000-0000-000000000b07",
            "type": "bot",
            "name": "Valor (fake)",
            "avatar_url": None,
            "bot": {"owner": {"type": "workspace", "workspace": True}, "workspace_name": "Fake"},
        }


def _title_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    if item["object"] == "page":
        return item["properties"]["Name"]["title"]
    return item["title"]
