"""Runs the face, voice and text analyzers for one turn, concurrently and off the event loop."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from npc_server.perception.face import FaceAnalyzer
from npc_server.perception.text import TextAnalyzer
from npc_server.perception.types import FaceReading, TextReading, VoiceReading
from npc_server.perception.voice import VoiceAnalyzer
from npc_server.settings import Settings
from npc_server.threads import one_core

T = TypeVar("T")


@dataclass
class Upload:
    data: bytes
    filename: str | None = None


@dataclass
class Perceived:
    """What one turn's media said about the player. A modality that was not sent is None."""

    face: FaceReading | None = None
    voice: VoiceReading | None = None
    text: TextReading | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class Perception:
    """Owns the per-modality models. All model work runs on a small dedicated thread pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.face = FaceAnalyzer(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_frames=settings.max_face_frames,
        )
        self.voice = VoiceAnalyzer(
            max_bytes=settings.max_audio_bytes,
            max_seconds=settings.max_audio_seconds,
            whisper_threads=settings.whisper_threads,
        )
        self.text = TextAnalyzer()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.perception_threads, thread_name_prefix="perception", initializer=one_core
        )

    def warm(self) -> None:
        self.face.warm()
        self.voice.warm()
        self.text.warm()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.face.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def perceive(self, text: str | None, faces: list[Upload], voice: Upload | None) -> Perceived:
        """Face and voice run concurrently; text runs on the typed text, or else on the transcript."""
        started = time.perf_counter()
        out = Perceived()
        jobs: dict[str, asyncio.Future[Any]] = {}
        if faces:
            jobs["face"] = asyncio.ensure_future(self._run(self.face.analyze, [f.data for f in faces]))
        if voice is not None:
            jobs["voice"] = asyncio.ensure_future(self._run(self.voice.analyze, voice.data, voice.filename))
        if text:
            jobs["text"] = asyncio.ensure_future(self._run(self.text.analyze, text))
        try:
            await asyncio.gather(*jobs.values())
        finally:  # one modality's bad input must not leave the others running unobserved
            for job in jobs.values():
                if not job.done():
                    job.cancel()
        out.face = jobs["face"].result() if "face" in jobs else None
        out.voice = jobs["voice"].result() if "voice" in jobs else None
        out.text = jobs["text"].result() if "text" in jobs else None
        if out.text is None and out.voice is not None and out.voice.transcript:
            out.text = await self._run(self.text.analyze, out.voice.transcript)
        for name in ("face", "voice", "text"):
            reading = getattr(out, name)
            if reading is not None:
                out.timings_ms.update({f"{name}_{k}": round(v, 1) for k, v in reading.timings_ms.items()})
        out.timings_ms["perception_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return out
