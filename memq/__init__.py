"""memq: a Mem0-style long-term memory layer run as a Celery job-queue pipeline.

This package holds only the leaves every layer may import: settings (`memq.config`), models
(`memq.models`), errors (`memq.errors`) and scope checks (`memq.scope`). It imports nothing else
from this project and no LLM, vector, graph or ML library at import time; ``memq.Memory`` (the
public client, `memories.client.Memory`) is loaded when first asked for.
"""

__version__ = "0.1.0"

__all__ = ["AsyncMemory", "Memory", "__version__"]


def __getattr__(name: str) -> object:
    """``from memq import Memory`` (Mem0's ``from mem0 import Memory``), loaded on first use so that
    importing the leaves (settings, models, errors) still pulls in no store or model library."""
    if name in ("Memory", "AsyncMemory"):
        import memories.client

        return getattr(memories.client, name)
    raise AttributeError(f"module 'memq' has no attribute {name!r}")
