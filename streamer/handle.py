"""What the doors (web/) may ask of an engine: the in-process `Engine` (streamer/engine.py) and a
front end's `EngineClient` of a core in another process (streamer/client.py) both are one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from streamer.request import Generation
from streamer.types import RequestError, SamplingParams


class EngineHandle(Protocol):
    model_name: str
    max_context: int
    tokenizer: Any  # the model's Hugging Face tokenizer (token texts, chat templates with tools)

    @property
    def live_requests(self) -> int: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0, client: str = "") -> Generation:
        """Queue a request, or raise RequestError; the Generation streams its events."""
        ...

    def delivered(self, gaps: list[float]) -> None:
        """Token frames went out, each `gaps[i]` s after its stream's previous one (`itl_sent`)."""
        ...

    def count_error(self, code: str) -> None:
        """A door refused something with `code` before it reached the engine."""
        ...

    async def stats(self, hdr: bool = False) -> dict: ...

    async def metrics_text(self) -> bytes: ...

    async def health(self) -> dict:
        """Model, context and KV figures; RequestError("unavailable") if the engine is not reachable."""
        ...

    def stop_accepting(self) -> None: ...

    async def wait_drained(self) -> None: ...

    def abort_all(self, error: RequestError) -> None: ...
