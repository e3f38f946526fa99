"""memq's public client and reads.

`Memory` (and `AsyncMemory`) is the client web apps use, with Mem0's method names and result shapes:
writes are jobs (add, update, delete, delete_all, batches, reset), reads are synchronous. `Memories`
holds the synchronous reads in memq's fuller shapes.
"""

from memories.api import Memories
from memories.client import AsyncMemory, Memory

__all__ = [
    # the client: Mem0's methods, every call scoped
    "Memory",
    "AsyncMemory",
    # reads in memq's own shapes
    "Memories",
]
