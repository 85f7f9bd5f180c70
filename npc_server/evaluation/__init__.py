"""Evaluation harnesses: `npc-server eval roleplay` measures how well NPCs stay in character (docs/roleplay.md)."""
