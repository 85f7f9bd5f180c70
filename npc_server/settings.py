"""One settings object. Every value comes from an `NPC_`-prefixed environment variable or a CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_PERSONAS = PACKAGE_ROOT.parent / "personas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NPC_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    data_dir: Path = Path("data")  # the SQLite database lives here
    cache_dir: Path | None = None  # converted model weights; default: <data_dir>/cache
    personas_dir: Path = DEFAULT_PERSONAS

    # "smollm2" (the embedded default), a local Hugging Face model folder, a .gguf file, or
    # "openai:<base url>" for any OpenAI-compatible server (vLLM, llama.cpp server, Ollama).
    model: str = "smollm2"
    openai_model: str = "default"  # the model name sent to an OpenAI-compatible server
    openai_api_key: str | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    llm_threads: int = Field(2, ge=1, le=64)
    context_tokens: int = Field(2048, ge=256, le=131072)  # prompt + reply budget
    # Continuous batching across sessions (Llama-architecture models); false: one request at a time.
    batching: bool = True
    max_batch: int = Field(16, ge=1, le=256)
    prefix_cache_tokens: int = Field(16384, ge=0, le=1_000_000)  # KV of recent prompts kept for reuse
    # Steps of up to 12 streams read a quantised copy of the weights: int4 where the weights are 4-bit levels
    # already (the embedded model's layers), else int8; larger batches the model's own. ~90 MiB more memory
    # for the embedded model.
    quantize: bool = True
    # Apply the LoRA adapters `npc-server finetune` left beside the persona files (personas/adapters/<id>/)
    adapters: bool = True
    # Sampling defaults; a persona's `generation` block overrides them.
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    repetition_penalty: float = Field(1.15, ge=1.0, le=2.0)
    max_new_tokens: int = Field(80, ge=8, le=512)
    # Replies sampled at once per turn; the one whose first sentence best fits the persona's voice streams on
    # (docs/roleplay.md). Needs the sentence embedder (perception); fewer are sampled when the engine is busy.
    reply_candidates: int = Field(4, ge=1, le=8)
    seed: int | None = None  # fixed seed makes sampling repeatable (tests, evaluation)

    # Request limits.
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(2000, ge=1, le=20000)

    # Perception: face, voice and text models, and the limits on what a turn may upload.
    perception: bool = True
    perception_threads: int = Field(2, ge=1, le=32)
    whisper_threads: int = Field(1, ge=1, le=32)  # CTranslate2 threads for speech recognition (see threads.py)
    fusion_checkpoint: Path | None = None  # a trained fusion checkpoint folder; default: the shipped one
    fusion_method: str | None = None  # attention, late, face, voice or text; default: the checkpoint's choice
    max_face_frames: int = Field(8, ge=1, le=64)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_audio_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(30.0, gt=0.5, le=600.0)

    # Live sessions (the /v1/live WebSocket): turn detection and per-connection limits (docs/live.md).
    live_silence_ms: int = Field(700, ge=200, le=5000)  # this much silence after speech ends the player's turn
    live_max_message_bytes: int = Field(2 * 1024 * 1024, ge=1024, le=16 * 1024 * 1024)  # one WebSocket message
    live_max_audio_seconds: float = Field(3600.0, gt=0.0, le=86400.0)  # audio one connection may stream in all
    live_max_fps: float = Field(3.0, gt=0.0, le=30.0)  # face frames kept per second; the rest are dropped
    live_max_messages_per_s: int = Field(200, ge=10, le=10000)
    live_idle_timeout_s: float = Field(300.0, gt=0.0, le=86400.0)  # no message from the client for this long
    live_max_connections: int = Field(256, ge=1, le=100000)
    live_send_queue: int = Field(256, ge=16, le=65536)  # events waiting for a slow client before it is dropped

    @field_validator("personas_dir")
    @classmethod
    def _personas_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"NPC_PERSONAS_DIR is not a directory: {value}")
        return value

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "npc.sqlite3"
