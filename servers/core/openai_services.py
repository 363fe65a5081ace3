"""OpenAI and Perplexity (through the openai SDK): search, images, vision, summaries.

The SDK is imported where a call is made, never at server import. Its own retry loop handles
429 and 5xx (honouring Retry-After) up to ``VALOR_OPENAI_MAX_RETRIES`` /
``VALOR_PERPLEXITY_MAX_RETRIES`` times; whatever still fails becomes a categorized ValorError
that says what to do, with the key never in the text.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servers.core.errors import Category, ValorError, describe_exception
from servers.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from servers.core.media import ImageFile

log = logging.getLogger("valor.openai")


@dataclass(frozen=True)
class Service:
    name: str  # for people: "OpenAI", "Perplexity"
    key_setting: str  # the variable to set


OPENAI = Service("OpenAI", "OPENAI_API_KEY")
PERPLEXITY = Service("Perplexity", "PERPLEXITY_API_KEY")


def openai_configured(settings: Settings | None = None) -> bool:
    return (settings or get_settings()).openai_api_key is not None


def require_key(service: Service, settings: Settings | None = None) -> str:
    """The service's API key, or a config error saying which variable to set."""
    settings = settings or get_settings()
    key = settings.perplexity_api_key if service is PERPLEXITY else settings.openai_api_key
    if key is None or not key.get_secret_value().strip():
        raise ValorError(
            Category.CONFIG, f"{service.name} is not configured: set {service.key_setting}."
        )
    return key.get_secret_value()


def client_for(service: Service, settings: Settings | None = None) -> AsyncOpenAI:
    from openai import AsyncOpenAI

    settings = settings or get_settings()
    key = require_key(service, settings)
    if service is PERPLEXITY:
        base_url = settings.perplexity_base_url
        timeout, retries = settings.perplexity_timeout_seconds, settings.perplexity_max_retries
    else:
        base_url = settings.openai_base_url
        timeout, retries = settings.openai_timeout_seconds, settings.openai_max_retries
    return AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=retries)


def translate_error(exc: Exception, service: Service) -> ValorError:
    """A categorized, actionable error for anything the SDK raised."""
    import openai

    name = service.name
    if isinstance(exc, ValorError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return ValorError(
            Category.TIMEOUT, f"{name} did not answer in time; try again in a moment."
        )
    if isinstance(exc, openai.APIConnectionError):
        return ValorError(
            Category.UPSTREAM, f"{name} could not be reached; check the network and its base URL."
        )
    if isinstance(exc, openai.AuthenticationError):
        return ValorError(
            Category.CONFIG, f"{name} rejected the API key: check {service.key_setting}."
        )
    if isinstance(exc, openai.PermissionDeniedError):
        return ValorError(
            Category.CONFIG, f"{name} denied access for this key or region ({_message(exc)})."
        )
    if isinstance(exc, openai.RateLimitError):
        retry_after = _retry_after(exc)
        wait = f" Retry after {retry_after:g} s." if retry_after is not None else ""
        return ValorError(
            Category.RATE_LIMIT,
            f"{name} is rate limiting or out of quota ({_message(exc)}).{wait}",
            retry_after=retry_after,
        )
    if isinstance(exc, openai.NotFoundError):
        return ValorError(
            Category.CONFIG, f"{name} does not know the configured model ({_message(exc)})."
        )
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        return ValorError(Category.INPUT, f"{name} refused the request: {_message(exc)}")
    if isinstance(exc, openai.APIStatusError):
        return ValorError(
            Category.UPSTREAM,
            f"{name} failed (HTTP {exc.status_code}); try again later.",
        )
    if isinstance(exc, ValueError | KeyError | TypeError | AttributeError | IndexError):
        log.warning("malformed reply from %s: %s", name, describe_exception(exc))
        return ValorError(Category.UPSTREAM, f"{name} sent a malformed reply; try again later.")
    if isinstance(exc, openai.OpenAIError):
        return ValorError(Category.UPSTREAM, f"{name} failed: {type(exc).__name__}.")
    raise exc


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
    return f"HTTP {getattr(exc, 'status_code', '?')}"


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# -- web search (Perplexity) ------------------------------------------------------------------
SEARCH_SYSTEM_PROMPT = (
    "You answer with current, factual information from the web. Be concise and specific, "
    "give dates where they matter, and mark each claim with its source number like [1]."
)


async def search_current_info(query: str, max_results: int) -> dict[str, Any]:
    settings = get_settings()
    client = client_for(PERPLEXITY, settings)
    try:
        completion = await client.chat.completions.create(
            model=settings.perplexity_model,
            messages=[
                {"role": "system", "content": SEARCH_SYSTEM_PROMPT},
                {"role": "user", "content": query},
            ],
        )
        answer = completion.choices[0].message.content
        if not isinstance(answer, str):
            raise ValueError("no answer text")
        extra = completion.model_extra or {}
    except Exception as exc:
        raise translate_error(exc, PERPLEXITY) from None
    finally:
        await client.close()
    return {
        "answer": answer.strip(),
        "model": settings.perplexity_model,
        "citations": _citations(extra)[:max_results],
    }


def _citations(extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Numbered sources from Perplexity's search_results (titles) or citations (URLs)."""
    titles: dict[str, str] = {}
    for item in extra.get("search_results") or []:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            titles[item["url"]] = str(item.get("title") or "")
    urls = [u for u in extra.get("citations") or [] if isinstance(u, str)] or list(titles)
    return [
        {"number": number, "url": url, "title": titles.get(url, "")}
        for number, url in enumerate(urls, 1)
    ]


# -- image generation ---------------------------------------------------------------------------
async def generate_image(prompt: str, size: str, quality: str, style: str) -> dict[str, Any]:
    """Image bytes plus the prompt the model actually used."""
    settings = get_settings()
    model = settings.openai_image_model
    client = client_for(OPENAI, settings)
    arguments: dict[str, Any] = {"model": model, "prompt": prompt, "size": size, "n": 1}
    if model.startswith("dall-e-3"):
        arguments |= {"quality": "hd" if quality == "high" else "standard", "style": style}
    elif model.startswith("gpt-image"):
        arguments["quality"] = quality
    if not model.startswith("gpt-image"):  # gpt-image always answers base64 and rejects the field
        arguments["response_format"] = "b64_json"
    try:
        result = await client.images.generate(**arguments)
        item = result.data[0]
        if item.b64_json:
            data = base64.b64decode(item.b64_json, validate=True)
        elif item.url:
            data = await _download_generated(item.url)
        else:
            raise ValueError("no image in the reply")
        revised = item.revised_prompt or prompt
    except Exception as exc:
        raise translate_error(exc, OPENAI) from None
    finally:
        await client.close()
    return {"data": data, "revised_prompt": revised, "model": model}


async def _download_generated(url: str) -> bytes:
    """Some compatible services answer with a URL; it goes through the SSRF guard too."""
    from servers.core.http_guard import IMAGE_TYPES, FetchLimits, fetch

    settings = get_settings()
    limits = FetchLimits(
        max_bytes=settings.image_max_bytes,
        timeout_seconds=settings.openai_timeout_seconds,
        max_redirects=settings.link_max_redirects,
        allowed_types=IMAGE_TYPES,
    )
    return (await fetch(url, limits=limits)).body


# -- vision -----------------------------------------------------------------------------------
QUESTION_PROMPT = (
    "Answer the question about this image directly and specifically. Say what in the image "
    "supports the answer; if the image does not show enough to answer, say so plainly."
)
DESCRIBE_PROMPT = (
    "Describe this image for someone who cannot see it: the subject, setting, notable details, "
    "any readable text (quoted exactly) and anything that seems important. Be concise."
)


def vision_messages(image: ImageFile, question: str) -> list[dict[str, Any]]:
    """Different instructions for a question versus a description."""
    encoded = base64.b64encode(image.data).decode()
    question = question.strip()
    text = f"Question: {question}" if question else "Describe this image."
    return [
        {"role": "system", "content": QUESTION_PROMPT if question else DESCRIBE_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:{image.mime_type};base64,{encoded}"},
                },
            ],
        },
    ]


async def analyze_image(image: ImageFile, question: str) -> dict[str, Any]:
    settings = get_settings()
    client = client_for(OPENAI, settings)
    try:
        completion = await client.chat.completions.create(
            model=settings.openai_vision_model,
            messages=vision_messages(image, question),
            max_tokens=800,
        )
        answer = completion.choices[0].message.content
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("empty analysis")
    except Exception as exc:
        raise translate_error(exc, OPENAI) from None
    finally:
        await client.close()
    return {"analysis": answer.strip(), "model": settings.openai_vision_model}


# -- summaries --------------------------------------------------------------------------------
SUMMARY_PROMPT = (
    "Summarize the article in two to four sentences for someone deciding whether to read it, "
    "then give up to five short topic tags. Answer only with JSON: "
    '{"summary": "...", "tags": ["...", "..."]}'
)


async def summarize(title: str, text: str, max_chars: int = 12_000) -> tuple[str, list[str]]:
    """(summary, tags) written by the configured chat model."""
    settings = get_settings()
    client = client_for(OPENAI, settings)
    try:
        completion = await client.chat.completions.create(
            model=settings.openai_chat_model,
            messages=[
                {"role": "system", "content": SUMMARY_PROMPT},
                {"role": "user", "content": f"Title: {title}\n\n{text[:max_chars]}"},
            ],
            max_tokens=400,
        )
        content = completion.choices[0].message.content or ""
        parsed = json.loads(_strip_fences(content))
        summary = parsed["summary"]
        tags = [str(tag).strip() for tag in parsed.get("tags") or [] if str(tag).strip()]
        if not isinstance(summary, str) or not summary.strip():
            raise ValueError("empty summary")
    except Exception as exc:
        raise translate_error(exc, OPENAI) from None
    finally:
        await client.close()
    return summary.strip(), tags[:5]


def _strip_fences(text: str) -> str:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    return match.group(0) if match else text
