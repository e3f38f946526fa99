"""The public facade for reading and deleting memories (Mem0's ``search``/``get``/``get_all``/
``history``/``delete``/``delete_all``), each call checked against the caller's scope."""

from memories.api import Memories

__all__ = [
    # reads and deletes, scope-checked
    "Memories",
]
