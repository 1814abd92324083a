"""Live interactive generation in the browser: a FastAPI server around one `Session` per device
(docs/live.md). `create_app(session_factory, settings)` builds the app; `serve.py` runs it."""
from .app import create_app, listening_socket
from .settings import ServerSettings

__all__ = ["create_app", "listening_socket", "ServerSettings"]
