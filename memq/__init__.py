"""memq: a Mem0-style long-term memory layer run as a Celery job-queue pipeline.

This package holds the leaves every layer may import (settings, models, errors, job records) and the
command line. It imports no LLM, vector, graph or ML library.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
