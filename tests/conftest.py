"""Shared fixtures: the embedded model's folder, Hugging Face references, a fake runner, a fake
generation for tests that drive a websocket `Connection` without an engine."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    from gpu.models import ensure_smollm2

    return ensure_smollm2()


def hf_model(name: str, device="cpu", dtype=torch.float32):
    """The same weights our engine loads for `name`, as a Hugging Face transformers model."""
    from gpu.models import load_hf_model

    return load_hf_model(name, device, dtype)


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_ids) -> list[list[int]]:
    """Greedy continuations from Hugging Face `generate`, one prompt at a time."""
    outs = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),  # explicit: id 0 is no padding here
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids) or None, pad_token_id=0,
            )
        outs.append(out[0, len(ids):].tolist())
    return outs


async def read_tokens(gen, out: list[int]) -> None:
    """Read a generation to its end, appending each token id to `out`. Token indices must run 0,
    1, 2, ...; the stream must not end in an error, and a finished one counts its tokens."""
    from streamer.types import TokenEvent

    async with gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                assert ev.index == len(out), (ev.index, len(out))
                out.append(ev.token_id)
            else:
                assert ev.finish_reason != "error", ev.error
                assert ev.finish_reason == "cancelled" or ev.completion_tokens == len(out), (ev, len(out))


async def read_streams(gens) -> list[list[int]]:
    """Read every generation concurrently (as `read_tokens`); each one's token ids."""
    import trio

    out: list[list[int]] = [[] for _ in gens]
    async with trio.open_nursery() as nursery:
        for gen, tokens in zip(gens, out, strict=True):
            nursery.start_soon(read_tokens, gen, tokens)
    return out


class FakeGeneration:
    """What a websocket `Connection` reads from an engine's `submit`: an async context manager
    iterating `_events()` (subclasses write it), with a `cancel` that does nothing."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    def __aiter__(self):
        return self._events()

    async def _events(self):
        raise NotImplementedError
        yield

    async def cancel(self) -> None:
        pass


@pytest.fixture
async def tiny_server():
    """(engine, base URL) of a real server on 127.0.0.1 port 0 serving random:tiny-qwen3."""
    import trio

    from streamer.config import EngineConfig
    from streamer.engine import open_engine
    from web.server import serve

    config = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=256, max_running=8, max_waiting=8)
    async with open_engine(config) as engine, trio.open_nursery() as nursery:
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        yield engine, binds[0]
        nursery.cancel_scope.cancel()
