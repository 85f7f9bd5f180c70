"""npc-server: a self-hosted dialogue server for game NPCs that sees, hears and reads the player."""

import os

# Small per-request torch models stall badly when OpenMP threads busy-wait on a shared 2-core box.
# This must be set before torch is first imported, so it lives at the package root.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
