"""How a hub divides its total cap among its links (sans-IO: numbers in, numbers out).

The rule (docs/operations.md, "One hub, many sites") is **max-min fairness**:
every link that has bytes to send gets an equal share of the total, but never
more than its own cap; what a capped link cannot use is divided again among
the others. A link that is idle or down reserves nothing: it keeps its own cap
(bounded by the total) so its acknowledgements and its first bytes can leave
at once, and the total gate (:class:`~quelay.transport.pacing.WireGate`
``parent``) makes sure that no mix of links exceeds the total meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping


def max_min_shares(total: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Each busy link's rate (bit/s) under ``total``; ``caps`` maps each busy link to
    its own cap (0 = none). The shares never sum above ``total``."""
    if total <= 0:
        raise ValueError("max_min_shares needs a total cap > 0")
    out: dict[str, int] = {}
    left = total
    todo = dict(caps)
    while todo:
        share = left // len(todo)
        limited = {name: cap for name, cap in todo.items() if 0 < cap <= share}
        if not limited:
            out.update(dict.fromkeys(todo, share))
            break
        for name, cap in limited.items():  # they take all they can use; the rest is shared
            out[name] = cap
            left -= cap
            del todo[name]
    return out


def effective_rates(total: int, caps: Mapping[str, int], busy: set[str], *,
                    floor: int = 0) -> dict[str, int]:
    """Every link's rate now: busy links their max-min share (at least ``floor``, the
    smallest rate a gate accepts), idle links their own cap bounded by the total.
    With no total (``total`` 0) every link simply has its own cap."""
    if total <= 0:
        return dict(caps)
    shares = max_min_shares(total, {name: caps[name] for name in busy if name in caps})
    out = {}
    for name, cap in caps.items():
        if name in shares:
            out[name] = max(floor, shares[name])
        else:
            out[name] = min(cap, total) if cap else total
    return out
