"""A local Slack incoming-webhook receiver (a tiny FastAPI app on loopback): where `procure fleet
demo` and the tests send the fleet's Slack messages instead of hooks.slack.com."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from procure.bounds import UnsafeInput, loads
from procure.local import LocalServer, serve

HOOK_PATH = "/services/T000/B000/local"


@dataclass
class SlackReceiver:
    server: LocalServer
    messages: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.server.url + HOOK_PATH

    def texts(self) -> list[str]:
        with self.lock:
            return [str(m.get("text", "")) for m in self.messages]

    def stop(self) -> None:
        self.server.stop()


def start_slack_receiver(echo: Callable[[str], None] | None = None) -> SlackReceiver:
    """Serve the receiver on a free loopback port. `echo` is called with each message's text
    as it arrives (the demo prints them)."""
    app = FastAPI()
    receiver: list[SlackReceiver] = []

    @app.post(HOOK_PATH)
    async def hook(request: Request) -> PlainTextResponse:
        try:
            payload = loads(await request.body())
        except (UnsafeInput, ValueError):
            return PlainTextResponse("invalid_payload", status_code=400)  # as Slack answers
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            return PlainTextResponse("no_text", status_code=400)
        with receiver[0].lock:
            receiver[0].messages.append(payload)
        if echo is not None:
            echo(payload["text"])
        return PlainTextResponse("ok")

    receiver.append(SlackReceiver(serve(app)))
    return receiver[0]
