"""Which checkpoint folders go: ours to decide, after a commit, never Ray Train's.

Ray Train's own retention (`CheckpointConfig(num_to_keep)`) removes the oldest checkpoint when its
controller registers a new report, which can come before rank 0 writes the new one's COMMITTED:
killed in between, a run would keep no committed checkpoint. So Ray Train keeps every folder, and
rank 0 prunes right after it commits (`train.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

from pipeline.core import layout
from pipeline.core.rundir import RunDir


def to_prune(names: list[str], committed: list[int], keep: int) -> list[str]:
    """The folders of `names` (in RUN/train/checkpoints) to remove, given the `committed` steps:
    committed ones older than the newest `keep` committed, and uncommitted ones older than the newest
    committed (what a killed save left). The newest committed one always stays, as does anything
    newer than it and anything that is not a step folder."""
    if not committed:
        return []
    newest, kept = max(committed), set(sorted(committed)[-max(keep, 1) :])
    pruned = []
    for name in names:
        step = layout.parse_step(name)
        if step is not None and step < newest and step not in kept:
            pruned.append(name)
    return pruned


def prune_checkpoints(run: RunDir, keep: int) -> list[int]:
    """Remove what `to_prune` names (rank 0, after a commit); the steps removed.

    A folder's COMMITTED goes first: one removed halfway is then only an uncommitted leftover,
    which the next prune takes, never a checkpoint to resume from.
    """
    committed = run.committed_steps(layout.TRAIN_CHECKPOINTS)
    pruned = to_prune(run.list(layout.TRAIN_CHECKPOINTS), committed, keep)
    for name in pruned:
        folder = f"{layout.TRAIN_CHECKPOINTS}/{name}"
        run.remove(f"{folder}/{layout.COMMIT_MARKER}")
        run.remove(folder)
    return [layout.parse_step(name) for name in pruned]
