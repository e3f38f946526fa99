"""The context-manager half every test server rig shares (Neo4j, PostgreSQL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Managed(ABC):
    """``with Rig() as rig:`` over the rig's `start` and `close`; `close` also runs when `start` fails
    half-way (``__exit__`` does not run when ``__enter__`` raises)."""

    @abstractmethod
    def start(self) -> Self:
        """Start the server; returns self."""

    @abstractmethod
    def close(self) -> None:
        """Stop the server and remove what it wrote."""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
