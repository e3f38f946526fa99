"""Stores: Qdrant (vectors), SQL history (SQLModel), and the embedder.

Import the submodules directly (`stores.vector_open`, `stores.history`, `stores.embedder`, ...); this package
imports none of them so that loading one backend does not load the others.
"""

__all__: list[str] = []
