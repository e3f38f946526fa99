"""memq: a Mem0-style long-term memory layer run as a Celery job-queue pipeline.

This package holds only the leaves every layer may import: settings (`memq.config`), models
(`memq.models`), errors (`memq.errors`) and scope checks (`memq.scope`). It imports nothing else
from this project and no LLM, vector, graph or ML library.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
