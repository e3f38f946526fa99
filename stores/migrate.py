"""Copy a vector store written by an older memq (`qdrant-client` local mode) into the embedded Edge store.

memq before the Edge store kept its vectors in `qdrant-client`'s local mode on ``qdrant.path``: a
``meta.json``, a ``collection/<name>/storage.sqlite`` per collection and a ``.lock``. `stores.edge.
open_edge` refuses such a folder (`StoreNeedsMigration`); ``memq migrate-store`` runs `migrate_local_mode`
once to copy every collection into an Edge shard ``<qdrant.path>/<name>``.

**Order (nothing is deleted).** (1) Open the local-mode store, check every collection (one unnamed cosine
vector of the embedder's size, no Edge shard of that name holding points yet) and read all its points
(ids, vectors, payloads) in pages of `PAGE`; (2) close it; (3) move the local-mode files into a backup
folder (``<qdrant.path>/local-mode-backup-<UTC time>``), after which the folder no longer reads as local
mode; (4) create each Edge shard, write the points as they were (raw payloads, not re-mapped through
`MemoryPoint`) in batches of `PAGE`, check that the shard counts as many points as were read, and close
it. A refusal in (1) changes nothing; a failure in (3) or (4) removes what was written to Edge and moves
the files back, so the folder is as it was before the run.

Local mode holds a whole collection in memory anyway, so reading it all first costs no more than
opening it did (memq warned beyond 20k points: a store that size belongs on a Qdrant server).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import qdrant_edge as qe
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from memq.errors import StoreError, StoreOwned
from stores.edge import EdgeStore, edge_point, is_local_mode_folder, open_edge, owner_of
from stores.vectors import dense_of

__all__ = ["LocalCollection", "MigrationReport", "inspect_local_mode", "migrate_local_mode", "default_backup",
           "LOCAL_MODE_FILES", "PAGE"]

logger = logging.getLogger(__name__)

PAGE = 256
"""Points per scroll page (reading) and per upsert batch (writing)."""
LOCAL_MODE_FILES = ("meta.json", "collection", ".lock")
"""What `qdrant-client` local mode keeps in its folder: moved into the backup folder, in this order."""


@dataclass(frozen=True)
class LocalCollection:
    """One collection of a local-mode store, as checked before a migration.

    Attributes:
        name: the collection's name (the Edge shard will be ``<root>/<name>``).
        dims: its vector size.
        points: how many points it holds.
    """

    name: str
    dims: int
    points: int


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate_local_mode` did.

    Attributes:
        collections: the collections copied into Edge shards (sorted by name).
        points: points copied per collection (each Edge shard counted as many afterwards).
        backup: the folder now holding the local-mode files (``meta.json``, ``collection/``, ``.lock``).
    """

    collections: tuple[str, ...]
    points: Mapping[str, int]
    backup: Path


@dataclass
class _Read:
    """The points of one collection, read before anything changes."""

    name: str
    ids: list[Any] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)


def default_backup(root: Path, now: datetime | None = None) -> Path:
    """Where the local-mode files go: ``<root>/local-mode-backup-<UTC time, e.g. 20250102T030405Z>``."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return root / f"local-mode-backup-{stamp}"


def _open_local(root: Path) -> QdrantClient:
    """`qdrant-client` local mode on `root` (it takes the folder's ``.lock``).

    Raises:
        StoreOwned: another process holds the folder (a worker of an older memq).
        StoreError: the folder cannot be read as a local-mode store.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Local mode is not recommended")
            return QdrantClient(path=str(root))
    except RuntimeError as exc:
        if "already accessed" in str(exc):
            raise StoreOwned(
                f"the local-mode vector store {root} is open in another process (a worker of an older memq?): "
                "stop it, then run `memq migrate-store` again") from None
        raise StoreError(f"cannot read the local-mode vector store {root}: {type(exc).__name__}") from None
    except Exception as exc:
        raise StoreError(f"cannot read the local-mode vector store {root}: {type(exc).__name__}") from None


def _edge_points(folder: Path) -> int:
    """Points in the Edge shard at `folder` (0 when there is none).

    Raises:
        StoreOwned: another process owns that shard.
        StoreError: the shard cannot be opened.
    """
    if not (folder / "edge_config.json").exists():
        return 0
    try:
        shard = qe.EdgeShard.load(str(folder))
    except Exception as exc:
        if "WouldBlock" in str(exc):
            raise StoreOwned(f"the embedded vector store {folder} is owned by {owner_of(folder)}: stop it, "
                             "then run `memq migrate-store` again") from None
        raise StoreError(f"cannot open the vector store {folder}: {type(exc).__name__}") from None
    try:
        return int(shard.count(qe.CountRequest(exact=True)))
    finally:
        shard.close()


def _check(client: QdrantClient, root: Path, dims: int) -> list[LocalCollection]:
    """Every collection of the open local-mode store, checked for a migration to Edge shards of `dims`.

    Raises:
        StoreError: a collection's name is not a plain folder name, its vectors are named, of another
            size than `dims` or not cosine, or an Edge shard of its name already holds points.
        StoreOwned: an Edge shard of its name is owned by another process.
    """
    found: list[LocalCollection] = []
    for name in sorted(c.name for c in client.get_collections().collections):
        if name in ("", ".", "..") or "/" in name or "\\" in name or name.startswith("local-mode-backup-"):
            raise StoreError(f"collection {name!r} in {root} cannot become an Edge shard folder of that name; "
                             "nothing was changed")
        vectors = client.get_collection(name).config.params.vectors
        if not isinstance(vectors, qm.VectorParams):
            raise StoreError(f"collection {name!r} in {root} has named vectors (memq writes one unnamed vector); "
                             "nothing was changed")
        if vectors.size != dims:
            raise StoreError(f"collection {name!r} in {root} holds vectors of size {vectors.size}, the embedder "
                             f"makes {dims} (MEMQ_EMBEDDER__DIMS); nothing was changed")
        if vectors.distance != qm.Distance.COSINE:
            raise StoreError(f"collection {name!r} in {root} uses {vectors.distance.value} distance, the Edge "
                             "store cosine; nothing was changed")
        held = _edge_points(root / name)
        if held:
            raise StoreError(f"the Edge shard {root / name} already holds {held} points; collection {name!r} "
                             "was not copied over them and nothing was changed")
        found.append(LocalCollection(name, vectors.size, client.count(name, exact=True).count))
    return found


def _read_points(client: QdrantClient, root: Path, name: str, dims: int) -> _Read:
    """All points of collection `name`, in pages of `PAGE`.

    Raises:
        StoreError: a point without an unnamed vector of `dims` floats.
    """
    read = _Read(name)
    offset: Any = None
    while True:
        records, offset = client.scroll(name, limit=PAGE, offset=offset, with_payload=True, with_vectors=True)
        for r in records:
            dense = dense_of(r.vector)
            vector = [float(x) for x in dense if isinstance(x, float | int)] if dense is not None else []
            if len(vector) != dims:
                raise StoreError(f"point {r.id} of collection {name!r} in {root} has no unnamed vector of size "
                                 f"{dims}; nothing was changed")
            read.ids.append(r.id)
            read.vectors.append(vector)
            read.payloads.append(dict(r.payload or {}))
        if offset is None:
            return read


def _read_local(root: Path, dims: int, *, points: bool) -> tuple[list[LocalCollection], list[_Read]]:
    """Check the local-mode store at `root` (and read its points when `points`); changes nothing.

    A ``.lock`` that local mode creates on opening a folder that had none is removed again.
    """
    lock = root / ".lock"
    had_lock = lock.exists()
    try:
        client = _open_local(root)
        try:
            found = _check(client, root, dims)
            read = [_read_points(client, root, c.name, dims) for c in found] if points else []
        except (StoreError, StoreOwned):
            raise
        except Exception as exc:
            raise StoreError(f"cannot read the local-mode vector store {root}: {type(exc).__name__}") from None
        finally:
            client.close()
    finally:
        if not had_lock:
            lock.unlink(missing_ok=True)
    return found, read


def inspect_local_mode(root: Path, dims: int) -> list[LocalCollection]:
    """What `migrate_local_mode` would copy from `root`, checked as it would check it; changes nothing.

    Args:
        root: the embedded store's folder (``qdrant.path``).
        dims: the embedder's vector size.

    Returns:
        The local-mode collections, sorted by name; [] when `root` holds no local-mode store.

    Raises:
        StoreError: a collection cannot be migrated (see `migrate_local_mode`).
        StoreOwned: the local-mode store, or an Edge shard of a collection's name, is open in another process.
    """
    if not is_local_mode_folder(root):
        return []
    return _read_local(root, dims, points=False)[0]


def _move(names: Sequence[str], source: Path, target: Path) -> list[str]:
    """Move `names` from `source` to `target`, undoing the moves made if one fails.

    Returns:
        The names moved.

    Raises:
        OSError: a move failed (the ones before it were moved back).
    """
    moved: list[str] = []
    try:
        for name in names:
            shutil.move(str(source / name), str(target / name))
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            shutil.move(str(target / name), str(source / name))
        raise
    return moved


def _write(store: EdgeStore, read: _Read) -> None:
    """Upsert the points of `read` as they are (plus their texts' BM25 terms), in batches of `PAGE`, and
    check the shard's count.

    Raises:
        StoreError: Edge refused a batch, or the shard counts another number of points than were read.
    """
    for start in range(0, len(read.ids), PAGE):
        batch = [edge_point(read.ids[i], read.vectors[i], read.payloads[i])
                 for i in range(start, min(start + PAGE, len(read.ids)))]
        try:
            store.shard.update(qe.UpdateOperation.upsert_points(batch))
        except Exception as exc:  # Edge raises plain Exceptions whose text may quote payloads
            raise StoreError(f"Qdrant Edge upsert into {store.folder}: {type(exc).__name__}") from None
    counted = store.count()
    if counted != len(read.ids):
        raise StoreError(f"the Edge shard {store.folder} counts {counted} points after the copy, "
                         f"{len(read.ids)} were read from collection {read.name!r}")


def _undo_edge(written: list[tuple[EdgeStore, bool, _Read]]) -> None:
    """Remove what this run wrote to Edge: a shard it created goes, one that was there (empty) loses the
    points written. Best effort: a failure is logged, the move back of the old files still happens."""
    for store, existed, read in reversed(written):
        try:
            if existed:
                store.delete(read.ids)
            store.close()
            if not existed:
                shutil.rmtree(store.folder)
        except Exception:
            logger.exception("migrate-store: could not undo the copy into %s; remove that folder by hand",
                             store.folder)


def migrate_local_mode(root: Path, dims: int, *, backup: Path | None = None) -> MigrationReport:
    """Copy every collection of the `qdrant-client` local-mode store at `root` into an Edge shard
    ``root/<collection>`` and move the local-mode files into `backup` (nothing is deleted).

    Run it with no memq process on the folder (``memq migrate-store``). The steps and their order are
    in the module's docstring: every check happens before anything changes, and a failure after the
    first change puts the folder back as it was.

    Args:
        root: the embedded store's folder (``qdrant.path``), holding ``meta.json`` and ``collection/``.
        dims: the embedder's vector size; every collection must hold vectors of this size.
        backup: where the local-mode files go; default ``root/local-mode-backup-<UTC time>``. It must
            not exist yet, or be an empty folder.

    Returns:
        The collections copied, the points copied per collection and the backup folder.

    Raises:
        StoreError: `root` holds no local-mode store; `backup` is a file or a non-empty folder; a
            collection has a name that cannot be a shard folder, named or non-cosine vectors, vectors of
            another size than `dims`, or an Edge shard of its name already holds points (nothing was
            changed); moving the files into `backup` failed (those moved were moved back); or copying
            into Edge failed (the folder was put back as it was, the shards this run made removed).
        StoreOwned: the local-mode store, or an Edge shard of a collection's name, is open in another
            process (nothing was changed).
    """
    if not is_local_mode_folder(root):
        raise StoreError(f"{root} holds no qdrant-client local-mode store (meta.json and collection/)")
    backup = backup if backup is not None else default_backup(root)
    if backup.exists() and (not backup.is_dir() or any(backup.iterdir())):
        raise StoreError(f"the backup folder {backup} exists and is not empty; nothing was changed")
    collections, read = _read_local(root, dims, points=True)

    made_backup = not backup.exists()
    try:
        backup.mkdir(parents=True, exist_ok=True)
        moved = _move([n for n in LOCAL_MODE_FILES if (root / n).exists()], root, backup)
    except BaseException as exc:
        if made_backup and backup.is_dir():
            backup.rmdir()
        if isinstance(exc, OSError):
            raise StoreError(f"cannot move the local-mode files of {root} into {backup} ({type(exc).__name__}); "
                             "nothing was changed") from exc
        raise
    logger.info("migrate-store: local-mode files of %s moved to %s", root, backup)

    written: list[tuple[EdgeStore, bool, _Read]] = []
    try:
        for points in read:
            existed = (root / points.name).exists()
            store = open_edge(root, points.name, dims)
            written.append((store, existed, points))
            _write(store, points)
        for store, _, _ in written:
            store.close()
    except BaseException:
        _undo_edge(written)
        try:
            _move(moved, backup, root)
            if made_backup:
                backup.rmdir()
        except OSError:
            logger.exception("migrate-store: could not move the local-mode files back from %s to %s; "
                             "move %s back by hand", backup, root, ", ".join(moved))
            raise StoreError(f"migrating {root} failed and the old files could not be moved back: move "
                             f"{', '.join(moved)} from {backup} back into {root} by hand") from None
        raise
    for c in collections:
        logger.info("migrate-store: collection %r: %d points copied into %s", c.name, c.points, root / c.name)
    return MigrationReport(tuple(c.name for c in collections), {p.name: len(p.ids) for p in read}, backup)
