"""The ``memq`` command line and the embedded demo: the face of memq, above every other package."""

__all__: list[str] = []
