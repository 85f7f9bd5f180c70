"""Everything the lifespan builds and the routes share."""

from __future__ import annotations

from dataclasses import dataclass, field

from npc_server.dialogue.service import TurnService
from npc_server.perception.service import Perception
from npc_server.personas.loader import PersonaFileError
from npc_server.personas.schema import Persona
from npc_server.settings import Settings
from npc_server.store.sqlite import Store


@dataclass
class AppState:
    settings: Settings
    personas: dict[str, Persona]
    persona_errors: list[PersonaFileError]
    store: Store
    service: TurnService | None = None  # set once the models are loaded and warm
    perception: Perception | None = None
    startup_ms: dict[str, float] = field(default_factory=dict)
