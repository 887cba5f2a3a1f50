"""The wire between the engine core and its front ends: msgspec structs, MessagePack-encoded, in
length-prefixed frames over a local stream socket (streamer/core.py serves it, streamer/client.py
dials it). A frame carries a list of messages: everything one side had ready at once.

Only ids, numbers and error codes cross it; text stays in the front ends.
"""

from __future__ import annotations

import struct

import msgspec
import trio

MAX_FRAME_BYTES = 64 * 1024 * 1024  # a frame longer than this is a broken peer, not a big step
_LEN = struct.Struct("<I")


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """Front end -> core, first: who is speaking."""

    frontend: int
    pid: int


class Submit(msgspec.Struct, tag="submit", array_like=True):
    rid: int  # the front end's own number for the request; unique on its connection
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    ignore_eos: bool
    priority: int
    client: str  # the fair policy's client key
    label: str  # the request's name in the core's logs
    logprobs: int | None = None  # as SamplingParams.logprobs
    grammar: tuple[str, str] | None = None  # as SamplingParams.grammar


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    rid: int


class Report(msgspec.Struct, tag="report", array_like=True):
    """Front end -> core, now and then: what only the front end sees, for the whole server's metrics."""

    sent_gaps: list[float]  # itl_sent: gaps between a stream's token frames as sent
    errors: list[str]  # error codes answered at the edge (never reached the core)
    loop_lag: list[float]  # the front end's event-loop lag samples, seconds
    live: int


class StatsQuery(msgspec.Struct, tag="stats?", array_like=True):
    nonce: int
    hdr: bool  # include the encoded since-start HDR histograms
    metrics: bool  # the Prometheus text instead of /stats


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    """Core -> front end, first: the facts a front end checks requests against."""

    model: str
    max_context: int
    capacity: int  # longest prompt + completion one request may reach
    limits: str  # what bounds the capacity, for prompt_too_long messages
    vocab_size: int
    kv_blocks: int
    block_size: int
    pid: int


class Finished(msgspec.Struct, array_like=True):
    rid: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float | None
    ttft_ms: float | None
    total_ms: float
    tpot_ms: float | None
    error_code: str | None = None
    error_message: str | None = None


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Token `tokens[at]` of its Step: its log-probability, and the top alternatives'."""

    at: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class Step(msgspec.Struct, tag="step", array_like=True):
    """Core -> front end, once per step with anything for it: token `tokens[i]` for request
    `rids[i]`, then the requests that finished (a finished request's last token comes first),
    then the log-probabilities of the tokens whose requests asked for them."""

    rids: list[int]
    tokens: list[int]
    finished: list[Finished]
    logprobs: list[TokenLogprobs] = []


class StatsReply(msgspec.Struct, tag="stats", array_like=True):
    nonce: int
    body: bytes  # the core's /stats (MessagePack), or its Prometheus text (as asked)


ToCore = Hello | Submit | Cancel | Report | StatsQuery
ToFrontend = Welcome | Step | StatsReply

_encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(list[ToCore])
to_frontend = msgspec.msgpack.Decoder(list[ToFrontend])


class MalformedFrame(Exception):
    """The peer sent bytes that are not a frame of this protocol."""


def encode(messages: list) -> bytes:
    payload = _encoder.encode(messages)
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Frames out of a trio stream, decoded with `decoder`; raises MalformedFrame on garbage."""

    def __init__(self, stream: trio.abc.ReceiveStream, decoder: msgspec.msgpack.Decoder) -> None:
        self.stream = stream
        self.decoder = decoder
        self._buf = bytearray()

    async def receive(self) -> list | None:
        """The next frame's messages; None at a clean end of stream."""
        while True:
            if len(self._buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(self._buf)
                if n > MAX_FRAME_BYTES:
                    raise MalformedFrame(f"frame of {n} bytes")
                if len(self._buf) >= _LEN.size + n:
                    payload = bytes(self._buf[_LEN.size:_LEN.size + n])
                    del self._buf[:_LEN.size + n]
                    try:
                        return self.decoder.decode(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise MalformedFrame(str(exc)) from None
            data = await self.stream.receive_some(1 << 16)
            if not data:
                if self._buf:
                    raise MalformedFrame("stream ended inside a frame")
                return None
            self._buf += data
