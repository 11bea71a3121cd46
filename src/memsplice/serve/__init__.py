"""`memsplice serve`: an OpenAI-compatible chat server whose memory is per-scope latent memory.

    from memsplice.serve import MemoryService, ServeConfig, create_app
    app = create_app(MemoryService(memory, MemoryStore(url), ServeConfig()))

The library never imports this package; it needs the `serve` extra (fastapi, uvicorn, sqlalchemy, psycopg,
prometheus-client).
"""

from .app import create_app
from .config import ServeConfig
from .scope_memory import ScopeMemory
from .service import MemoryService

__all__ = ["MemoryService", "ScopeMemory", "ServeConfig", "create_app"]
