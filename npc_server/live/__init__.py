"""Live sessions over a WebSocket: the protocol (protocol.py), turn detection (vad.py), flow control
(flow.py) and the per-connection state machine (session.py). The route is npc_server/api/live.py."""
