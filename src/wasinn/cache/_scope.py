"""Which cached answers may serve a request: its scope (an exact-match key) and its question.

The question, what gets embedded, is the last user message (or the completion's prompt).
Everything else that changes the answer must match exactly and goes into the scope's hash:
the tenant, the model (and what file it is), the sampling settings, the conversation before
the last user turn and any turn after it, and the embedder. A cache keyed on the last message
alone would answer "and in French?" with the French of another conversation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal

from ..server._api import Caller, GenerationRequest

#: a request header that names the tenant, for a gateway that authenticates in front of us
TENANT_HEADER = "x-wasinn-tenant"

CacheMode = Literal["use", "refresh", "off"]


def _digest(material: object) -> str:
    data = json.dumps(material, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def tenant(caller: Caller) -> list[str | None]:
    """The tenant: a hash of the API key (the key itself is never kept) and the tenant header.

    With both, both count: the header narrows a key's entries and can never reach another
    key's, so a client cannot read another tenant's answers by sending a header.
    """
    key = None
    if caller.api_key:
        key = hashlib.sha256(b"wasinn-tenant\0" + caller.api_key.encode("utf-8")).hexdigest()
    return [key, caller.headers.get(TENANT_HEADER) or None]


def question_text(request: GenerationRequest) -> str | None:
    """What gets embedded: the last user message, or the prompt; None when there is no
    question to look up (a chat without a user message, or a blank one)."""
    if request.prompt is not None:
        text = request.prompt
    else:
        assert request.messages is not None
        users = [m for m in request.messages if m.role == "user"]
        if not users:
            return None
        text = users[-1].content
    return text if text.strip() else None


def scope(request: GenerationRequest, *, embedding_model: str, dimensions: int,
          model_version: str = "") -> str:
    """The exact-match key of a request that has a question (a hex digest)."""
    if request.prompt is not None:
        kind = "completion"
        before: list[list[str | None]] = []
        after: list[list[str | None]] = []
    else:
        assert request.messages is not None
        kind = "chat"
        last = max(i for i, m in enumerate(request.messages) if m.role == "user")
        turns = [[m.role, m.content, m.name] for m in request.messages]
        before, after = turns[:last], turns[last + 1:]
        # the user's name is part of the turn, not of the question
        after.insert(0, ["user-name", request.messages[last].name, None])
    return _digest({
        "v": 1,
        "tenant": tenant(request.caller),
        "kind": kind,
        "model": [request.model, model_version],
        "sampling": dataclasses.asdict(request.sampling),
        "before": _digest(before),
        "after": after,
        "embedder": [embedding_model, dimensions],
    })


def cache_mode(caller: Caller) -> CacheMode:
    """From the request's Cache-Control: `no-store` neither reads nor writes the cache,
    `no-cache` (or `max-age=0`) does not read it but stores the fresh answer."""
    directives = {d.strip().lower() for d in caller.headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return "off"
    if "no-cache" in directives or "max-age=0" in directives:
        return "refresh"
    return "use"
