"""The peer: llama-cpp-python's OpenAI-compatible server on the same SmolLM2 GGUF, same prompts.

Built from PyPI into .cache/peer-native/ on first use (a source build tuned for this CPU: about 5 minutes on
2 cores), or skipped with the reason recorded in the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import Sample, free_port
from npc_server.personas.loader import load_personas
from npc_server.personas.prompt import build_messages
from npc_server.settings import DEFAULT_PERSONAS, Settings

VERSION = "0.3.36"


class Peer:
    def __init__(self, gguf: Path, cache: Path) -> None:
        self.gguf = gguf
        self.venv = cache
        self.python = cache / "bin" / "python"
        self.proc: subprocess.Popen[bytes] | None = None
        self.skipped = ""
        self.personas, _ = load_personas(DEFAULT_PERSONAS)
        self.settings = Settings()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _build(self) -> bool:
        if self.python.exists() and subprocess.run([self.python, "-c", "import llama_cpp.server"]).returncode == 0:
            return True
        print(f"building llama-cpp-python {VERSION} into {self.venv} (takes minutes)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        result = subprocess.run([self.python, "-m", "pip", "install", "-q", f"llama-cpp-python[server]=={VERSION}"])
        if result.returncode != 0:
            self.skipped = f"skipped: pip could not build llama-cpp-python {VERSION} (exit {result.returncode})"
            return False
        return True

    def start(self) -> bool:
        if not self._build():
            print(self.skipped, file=sys.stderr)
            return False
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "llama_cpp.server",
                "--model",
                str(self.gguf),
                "--port",
                str(self.port),
                "--n_ctx",
                str(self.settings.context_tokens),
                "--n_threads",
                "2",
                "--interrupt_requests",
                "False",
                "--chat_format",
                "chatml",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    self.skipped = f"llama-cpp-python {VERSION}, same GGUF, --interrupt_requests False, 2 threads"
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.skipped = "skipped: the peer server did not start"
        return False

    async def turn(self, client: httpx.AsyncClient, npc: str, text: str) -> Sample:
        """The same prompt npc-server builds for a fresh session, with the same sampling settings."""
        messages, _ = build_messages(self.personas[npc], [], text, count_tokens=lambda m: 0, budget=1)
        s = self.settings
        body = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "repeat_penalty": s.repetition_penalty,
        }
        sent = time.perf_counter()
        first = None
        tokens = 0
        async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
                if delta:
                    tokens += 1
                    first = first or time.perf_counter()
        end = time.perf_counter()
        return Sample(first_ms=((first or end) - sent) * 1000, total_ms=(end - sent) * 1000, tokens=tokens)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
