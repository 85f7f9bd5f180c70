"""The app factory. The lifespan opens the store, loads personas and then loads and warms the models in
the background, so /healthz answers at once and /readyz turns 200 when everything is warm."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI

from npc_server import __version__
from npc_server.api import errors, health, live, npcs, sessions, turns
from npc_server.api.middleware import BodyLimit
from npc_server.dialogue.service import TurnService
from npc_server.finetune import adapter_dir, fingerprint
from npc_server.fusion.runtime import AffectFuser
from npc_server.live.flow import LiveHub
from npc_server.llm.engine import Engine, EngineRunner, GenerationStats, Message, SamplingParams
from npc_server.perception.service import Perception
from npc_server.personas.loader import load_personas
from npc_server.personas.prompt import fixed_messages
from npc_server.personas.schema import Persona
from npc_server.settings import Settings
from npc_server.state import AppState
from npc_server.store.sqlite import Store
from npc_server.threads import in_own_thread, one_core, use_cores

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]
T = TypeVar("T")


def load_engine(settings: Settings) -> Engine:
    """The configured model, loaded and warmed (blocking: runs in a worker thread)."""
    from npc_server.llm.batched import BatchedEngine
    from npc_server.llm.local import LocalEngine
    from npc_server.llm.remote import OpenAIEngine
    from npc_server.llm.weights import resolve_model

    if settings.model.startswith("openai:"):
        remote = OpenAIEngine(
            settings.model.removeprefix("openai:"),
            settings.openai_model,
            api_key=settings.openai_api_key,
            context_tokens=settings.context_tokens,
        )
        remote.warm()
        return remote
    use_cores(settings.llm_threads)  # every core while loading: this thread ends afterwards
    folder = resolve_model(settings.model, settings.resolved_cache_dir)
    engine: LocalEngine
    if settings.batching and '"llama"' in (folder / "config.json").read_text():
        engine = BatchedEngine(
            folder,
            dtype=settings.dtype,
            context_tokens=settings.context_tokens,
            max_batch=settings.max_batch,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            quantize=settings.quantize,
            threads=settings.llm_threads,
        )
    else:
        engine = LocalEngine(
            folder, dtype=settings.dtype, context_tokens=settings.context_tokens, threads=settings.llm_threads
        )
    engine.warm()
    return engine


def load_adapters(engine: Engine, personas: dict[str, Persona], settings: Settings) -> None:
    """Each persona's LoRA adapter, where `npc-server finetune` left one (blocking: a worker thread)."""
    load = getattr(engine, "load_adapter", None)
    if not settings.adapters or load is None:
        return
    for persona_id, persona in personas.items():
        folder = adapter_dir(settings.personas_dir, persona_id)
        if not (folder / "adapter_config.json").is_file():
            continue
        try:
            trained = json.loads((folder / "training.json").read_text())
            if trained.get("persona_sha256") != fingerprint(persona):
                log.warning("adapter for %s not loaded: the persona file changed since; rerun finetune", persona_id)
                continue
            load(persona_id, folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("adapter for %s not loaded: %s", persona_id, exc)
        else:
            log.info("adapter for %s loaded from %s", persona_id, folder)


def prefill_personas(
    engine: Engine, personas: dict[str, Persona], adapter: Callable[[Persona], str | None] = lambda _: None
) -> None:
    """Put every persona's fixed prompt into the engine's prefix cache for good, so every turn with each NPC,
    the first included, only computes what follows it (blocking: a worker thread). `adapter`: the LoRA adapter
    the persona's turns run with (its KV differs)."""
    cache = getattr(engine, "prefix_cache", None)
    if cache is None or cache.max_tokens == 0:
        return
    for persona in personas.values():
        params = SamplingParams(temperature=0.0, max_new_tokens=1, adapter=adapter(persona))
        messages = [*fixed_messages(persona), Message("user", "Hello.")]
        for _ in engine.generate(messages, params, GenerationStats(), threading.Event()):
            pass
    cache.pin()  # never pushed out by conversations


def load_perception(settings: Settings) -> tuple[Perception, AffectFuser]:
    """Face, voice and text models and the fusion model, loaded and warmed (blocking: a worker thread)."""
    perception = Perception(settings)
    perception.warm()
    return perception, AffectFuser.load(settings.fusion_checkpoint, settings.fusion_method)


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = load_engine) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The event loop's thread (it runs the fusion net) and worker threads (asyncio.to_thread) run torch on
        # one core: the engine's scheduler owns the cores.
        one_core()
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=one_core))
        personas, problems = load_personas(settings.personas_dir)
        for problem in problems:
            log.warning("persona not loaded: %s", problem)
        log.info("loaded %d personas from %s", len(personas), settings.personas_dir)
        store = Store(settings.database_path)
        state = AppState(settings=settings, personas=personas, persona_errors=problems, store=store)
        app.state.npc = state

        async def timed(name: str, fn: Callable[[Settings], T]) -> T:
            started = time.perf_counter()
            result = await in_own_thread(fn, settings)  # its torch workers end with it
            state.startup_ms[name] = round((time.perf_counter() - started) * 1000, 1)
            return result

        async def load() -> None:
            started = time.perf_counter()
            try:
                # One after the other: transformers changes torch's global default dtype while it loads a
                # bf16 model, which would leak into models built on another thread at the same time.
                engine = await timed("llm_ms", engine_factory)
                await in_own_thread(load_adapters, engine, personas, settings)
                perception, fuser = (
                    await timed("perception_ms", load_perception) if settings.perception else (None, None)
                )
            except Exception:
                log.exception("model loading failed; the server stays unready")
                return
            state.perception = perception
            # The text analyzer's sentence embedder scores reply candidates; the personas' voice centroids are
            # embedded once, here (in a worker thread: it runs the embedder).
            embed = perception.text.embed if perception is not None else None
            service = await asyncio.to_thread(
                TurnService, personas, EngineRunner(engine), store, settings, perception, fuser, embed
            )
            await timed("prefill_ms", lambda _: prefill_personas(engine, personas, service.adapter))
            state.service = service  # ready
            state.startup_ms["ready_ms"] = round((time.perf_counter() - started) * 1000, 1)
            log.info("ready in %.1f s (model %s)", time.perf_counter() - started, engine.name)

        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            if state.service is not None:
                state.service.runner.close()
            if state.perception is not None:
                state.perception.close()
            store.close()

    app = FastAPI(
        title="npc-server",
        version=__version__,
        summary="In-character NPC dialogue that sees, hears and reads the player.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.live = LiveHub(settings.live_max_connections)
    for module in (health, npcs, turns, sessions, live):
        app.include_router(module.router)
    return app
