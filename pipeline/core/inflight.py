"""Run many Ray tasks with a bounded number in flight: the driver's scheduling stays O(items).

Submitting every task at once and calling `ray.wait(pending, num_returns=1)` in a loop rescans the
whole pending list per finished task: O(S²) at S shards (≈5×10⁹ checks at 100,000). Here at most
`limit` references are pending, so each wait is O(limit), and the object store holds at most
`limit` results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")


def bounded(
    submit: Callable[[Item], Any],
    items: Iterable[Item],
    limit: int,
    on_error: Callable[[Item, Exception], Any] | None = None,
) -> Iterator[tuple[Item, Any]]:
    """Submit `submit(item)` (an ObjectRef) for each item, at most `limit` in flight; yield
    (item, result) as each finishes, in completion order. A task's error raises here, or, with
    `on_error`, yields (item, on_error(item, error)) and the other items go on.

    Left early (an error raised here or by the caller, or the loop broken off), it cancels the
    tasks still in flight and waits until they have stopped: they must not run on after what
    they use is gone (the toy server, a full disk's run directory) and record shards of errors.
    """
    import ray

    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    items = iter(items)
    pending: dict[Any, Item] = {}
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                item = next(items, _END)
                if item is _END:
                    exhausted = True
                    break
                pending[submit(item)] = item
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            if on_error is None:
                yield item, ray.get(done[0])
                continue
            try:
                result = ray.get(done[0])
            except Exception as error:  # noqa: BLE001 - the caller decides what a failed item counts as
                result = on_error(item, error)
            yield item, result
    except BaseException:  # GeneratorExit too: the caller stopped early
        cancel(list(pending))
        raise


def cancel(refs: list[Any], timeout_s: float = 60.0) -> None:
    """Stop these tasks. A plain task is killed (force: it may be blocked in a download) and waited
    for, up to `timeout_s`; an actor's is cancelled as Ray allows (not forced, not waited for: its
    owner kills the actor)."""
    import ray

    killed = []
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
            killed.append(ref)
        except ValueError:  # an actor task: force is refused
            ray.cancel(ref)
    if killed:
        ray.wait(killed, num_returns=len(killed), timeout=timeout_s)


_END: Any = object()
