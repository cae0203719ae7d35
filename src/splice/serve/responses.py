"""OpenAI's response shapes for completions and chat completions, whole or streamed, and the text of a stream."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An HTTP error with OpenAI's body: status, one-line message, error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class TextStream:
    """Token ids → text, handed out in pieces; stop strings end it (the text before the stop string is kept).

    With `echo_ids` (a completion's `echo`), the text is the decoding of prompt + generated tokens together, so
    the join between them is whatever the tokenizer makes of it; stop strings are looked for after the prompt.
    """

    def __init__(self, tokenizer: Any, stops: list[str], echo_ids: list[int] | None = None):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.echo_ids = list(echo_ids or [])
        self.ids: list[int] = []
        self.text = self._decode()
        self.start, self.sent = len(self.text), 0
        self.finish: str | None = None
        self.error: str | None = None

    def _decode(self) -> str:
        ids = self.echo_ids + self.ids
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""

    def add(self, token: int, is_stop: bool) -> bool:
        """Add a token; True when a stop string ended the text."""
        if is_stop:
            return False
        self.ids.append(token)
        text = self._decode()
        for s in self.stops:
            at = text.find(s, self.start)
            if at >= 0:
                self.text, self.finish = text[:at], "stop"
                return True
        self.text = text
        return False

    def take(self) -> str:
        """The text not handed out yet (held back while it ends in half a UTF-8 character)."""
        ready = self.text if self.finish else self.text.rstrip("\ufffd")
        piece = ready[self.sent:]
        self.sent = max(self.sent, len(ready))
        return piece


@dataclass
class ResponseShape:
    """OpenAI's response objects for completions and chat completions."""

    id: str
    model: str
    chat: bool
    created: int

    def full(self, streams: list[TextStream], prompt_tokens: int) -> dict:
        errors = [s.error for s in streams if s.error]
        if errors:
            raise ApiError(500, errors[0], "server_error")
        choices = [{"index": i, "finish_reason": s.finish or "stop", "logprobs": None,
                    **({"message": {"role": "assistant", "content": s.text}} if self.chat else {"text": s.text})}
                   for i, s in enumerate(streams)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(streams, prompt_tokens)}

    def chunk(self, i: int, piece, finish: str | None) -> dict:
        if self.chat:
            delta = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": piece, "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    def usage(self, streams: list[TextStream], prompt_tokens: int) -> dict:
        completion = sum(len(s.ids) for s in streams)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def usage_chunk(self, streams: list[TextStream], prompt_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage(streams, prompt_tokens)}
