"""The order a batch of jobs is queued in: one job of each scope in turn.

A scope's jobs run their decide and writes one after another (each waits for its scope's turn,
`jobs.add`), while jobs of different scopes run side by side. The queues are first in, first out, so a
batch queued scope after scope (a backfill reads one conversation, then the next) held every later
scope's first job behind the earlier scopes' whole backlog, and those scopes' chains started late: over
100 LoCoMo adds (10 conversations of 10 sessions, one worker of 16 threads, model at 300 ms) the last
conversation's first job ended after 8-9 s of a 12-13 s run. Queued in turn, every scope's first job
comes within the first round, and its chain starts at once (`bench/vs_mem0.py`; see the README's
figures). A weighted fair queue would do the same across batches; one round robin per batch is enough
for a batch, and a web app's adds arrive interleaved already.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def round_robin(keys: Sequence[Hashable]) -> list[int]:
    """The positions of `keys` (one per job: its scope) in the order to queue them: the first job of
    each key in order of first appearance, then the second of each, and so on.

    Each key's jobs keep their own order, so a scope's jobs run in the order given.

    Args:
        keys: each job's scope key (`memq.models.Scope.key`), in the caller's order.

    Returns:
        A permutation of ``range(len(keys))``; ``[]`` for no keys.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order: list[int] = []
    rounds = max((len(g) for g in groups.values()), default=0)
    for r in range(rounds):
        order += [g[r] for g in groups.values() if r < len(g)]
    return order
