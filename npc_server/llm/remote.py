"""Any OpenAI-compatible chat server (vLLM, llama.cpp server, Ollama, TGI) as the engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx

from npc_server.llm.engine import GenerationStats, Message, SamplingParams


class OpenAIEngine:
    """Streams `POST {base_url}/chat/completions`; many requests may run at once (the server batches)."""

    max_concurrency = 32

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, context_tokens: int = 4096) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.context_tokens = context_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(120, connect=5))

    def count_tokens(self, messages: list[Message]) -> int:
        """An estimate (the server's tokenizer is not here): about 4 characters a token, plus framing."""
        return sum(len(m.content) // 4 + 4 for m in messages)

    def warm(self) -> None:
        for _ in self.generate([Message("user", "Hello.")], SamplingParams(max_new_tokens=1), GenerationStats(),
                               threading.Event()):
            pass

    def close(self) -> None:
        self._client.close()

    def generate(
        self,
        messages: list[Message],
        params: SamplingParams,
        stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]:
        started = time.perf_counter()
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop)[:4] or None,
            "seed": params.seed,
        }
        stats.prompt_tokens = self.count_tokens(messages)
        stats.finish_reason = "length"
        with self._client.stream("POST", self.url, json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if not stats.completion_tokens:
                        stats.first_token_ms = (time.perf_counter() - started) * 1000
                    stats.completion_tokens += 1
                    yield delta
                if choice.get("finish_reason"):
                    stats.finish_reason = "stop" if choice["finish_reason"] == "stop" else "length"
