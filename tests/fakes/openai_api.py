"""Fake OpenAI-compatible API: OpenAI itself, Perplexity (citations) and Ollama's /v1 endpoint."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import FakeService, RecordedRequest, Reply, sse

ChatResponder = Callable[[dict[str, Any]], "str | dict[str, Any]"]
TranscriptionResponder = Callable[["Upload"], str]


@dataclass(frozen=True)
class Upload:
    """A multipart form as the fake read it: text fields, and the file's name, type and bytes."""

    fields: dict[str, str]
    file_name: str
    content_type: str
    data: bytes


def parse_multipart(request: RecordedRequest) -> Upload:
    """A ``multipart/form-data`` body (what the SDK sends for audio), read with the stdlib."""
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    form = email.message_from_bytes(head + request.body, policy=email.policy.HTTP)
    fields: dict[str, str] = {}
    name, kind, data = "", "", b""
    for part in form.iter_parts():
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            name, kind, data = part.get_filename(), part.get_content_type(), payload
        else:
            fields[str(part.get_param("name", header="content-disposition"))] = payload.decode()
    return Upload(fields, name, kind, data)


def tiny_png(width: int = 4, height: int = 4, rgb: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A valid, solid-colour RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


class FakeOpenAI(FakeService):
    """`chat_reply` or `chat_responder(request_json) -> str | message dict` answers chats.

    A dict responder result is the assistant message, e.g. {"content": None, "tool_calls": [...]}.
    Set `citations` (a list of URLs) to answer like Perplexity. `transcript` (or
    `transcription_responder(upload) -> str`) answers `/v1/audio/transcriptions`.
    """

    def __init__(self, required_api_key: str | None = None) -> None:
        super().__init__(required_api_key)
        self.chat_reply = "Hello from the fake OpenAI."
        self.chat_responder: ChatResponder | None = None
        self.citations: list[str] | None = None
        self.models = ["gpt-4o-mini", "gpt-image-1", "sonar", "llama3.2"]
        self.image = tiny_png()
        self._image_numbers = itertools.count(1)
        self.transcript = "Hello from the fake transcription."
        self.transcription_responder: TranscriptionResponder | None = None
        self.route("POST", r"/v1/chat/completions", self._chat)
        self.route("POST", r"/v1/images/generations", self._images)
        self.route("GET", r"/v1/models", self._models)
        self.route("POST", r"/v1/audio/transcriptions", self._transcription)
        self.route("GET", r"/files/(?P<name>[\w.-]+\.png)", lambda request, name: self._png())
        self.route("GET", r"/api/tags", self._ollama_tags)  # Ollama's native liveness probe

    def error_body(self, status: int, message: str) -> Any:
        kind, code = {
            401: ("invalid_request_error", "invalid_api_key"),
            403: ("invalid_request_error", "unsupported_country_region_territory"),
            404: ("invalid_request_error", "model_not_found"),
            429: ("requests", "rate_limit_exceeded"),
            503: ("server_error", "service_unavailable"),
        }.get(status, ("server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.requests_to(r"/v1/chat/completions", "POST")]

    # -- handlers ----------------------------------------------------------------------------
    def _assistant_message(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.chat_responder(body) if self.chat_responder else self.chat_reply
        message = {"content": answer} if isinstance(answer, str) else dict(answer)
        return {"role": "assistant", "refusal": None, **message}

    def _search_fields(self) -> dict[str, Any]:
        if self.citations is None:
            return {}
        results = [{"title": f"Source {i}", "url": url} for i, url in enumerate(self.citations, 1)]
        return {"citations": list(self.citations), "search_results": results}

    def _chat(self, request: RecordedRequest) -> Reply | dict[str, Any]:
        body = request.json() or {}
        message = self._assistant_message(body)
        finish_reason = "tool_calls" if message.get("tool_calls") else "stop"
        content = message.get("content") or ""
        usage = {
            "prompt_tokens": max(1, len(request.body) // 4),
            "completion_tokens": max(1, len(content) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": body.get("model", "gpt-4o-mini"),
            "system_fingerprint": "fp_fake",
            **self._search_fields(),
        }
        if not body.get("stream"):
            choice = {"index": 0, "message": message, "logprobs": None}
            choice["finish_reason"] = finish_reason
            return {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**envelope, "object": "chat.completion.chunk", "choices": [choice], **extra}

        middle = len(content) // 2
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": part} for part in (content[:middle], content[middle:]) if part]
        if message.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            deltas.append({"tool_calls": calls})
        events = [chunk(delta) for delta in deltas] + [chunk({}, finish_reason)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk({}), "choices": [], "usage": usage})
        return sse([*((None, event) for event in events), (None, "[DONE]")])

    def _images(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.json() or {}
        model = body.get("model") or "dall-e-2"
        default_format = "b64_json" if model.startswith("gpt-image") else "url"
        response_format = body.get("response_format") or default_format
        data = []
        for _ in range(int(body.get("n") or 1)):
            if response_format == "b64_json":
                image = {"b64_json": base64.b64encode(self.image).decode()}
            else:
                image = {"url": f"{self.url}/files/image-{next(self._image_numbers)}.png"}
            data.append({**image, "revised_prompt": body.get("prompt", "")})
        return {"created": int(time.time()), "data": data}

    @property
    def transcription_uploads(self) -> list[Upload]:
        return [parse_multipart(r) for r in self.requests_to(r"/v1/audio/transcriptions", "POST")]

    def _transcription(self, request: RecordedRequest) -> Reply | dict[str, Any]:
        upload = parse_multipart(request)
        if not upload.data or "model" not in upload.fields:
            return self.error(400, "file and model are required")
        text = (
            self.transcription_responder(upload)
            if self.transcription_responder
            else self.transcript
        )
        if upload.fields.get("response_format") == "text":
            return Reply(body=text, headers={"Content-Type": "text/plain"})
        return {"text": text, "usage": {"type": "duration", "seconds": 1}}

    def _png(self) -> Reply:
        return Reply(body=self.image, headers={"Content-Type": "image/png"})

    def _models(self, request: RecordedRequest) -> dict[str, Any]:
        models = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for name in self.models
        ]
        return {"object": "list", "data": models}

    def _ollama_tags(self, request: RecordedRequest) -> dict[str, Any]:
        return {"models": [{"name": name, "model": name} for name in self.models]}
