"""The store-and-forward floor of a fleet's completion times (section G's "floor" column).

A peer serves a chunk on only once it is whole and verified, so copies of the image cannot
spread faster than the binomial pipeline (Mundinger, Weber and Weiss, "Optimal scheduling of
peer-to-peer file dissemination", J. Scheduling 2008), in whole piece times tau = S / (k B):
- in tick t the origin feeds at most c = egress / B agents at B, and every agent that held a
  piece before tick t feeds at most one more; so at most u(t) = c 2^(t-1) agents receive in tick
  t, and at most h(t) = c (2^t - 1) agents hold a piece after it;
- each agent receives at most one piece per tick (its download cap) and needs k of them.
For the m agents that finish first (the p50's m is the median's rank):
- the m-th agent to hold any piece gets it in tick t0(m) = min{t : h(t) >= m} at the earliest
  and then needs k ticks more: the m-th to finish does so at t0(m) + k - 1 at the earliest;
- in tick t at least m - u(t) of them receive nothing, so their mean completion is at least
  k + sum_t max(0, m - u(t)) / m, and the m-th finishes no earlier than their mean.
The floor is the larger of the two, in multiples of S/B (k ticks). It is what no
store-and-forward scheme beats with k pieces; cut-through (serving a piece while it arrives)
would need digests of pieces smaller than a chunk.
"""

from __future__ import annotations


def floor_ticks(n: int, m: int, k: int, c: float) -> float:
    """The earliest tick by which `m` of `n` agents can hold all `k` pieces, origin feeding `c` at B."""
    if not 1 <= m <= n or k < 1 or c <= 0:
        raise ValueError(f"floor: expected 1 <= m <= n, k >= 1, c > 0, got n={n} m={m} k={k} c={c}")
    t0 = 1
    while c * (2**t0 - 1) < m:
        t0 += 1
    idle = 0.0
    t = 1
    while (u := c * 2 ** (t - 1)) < m:
        idle += m - u
        t += 1
    return max(t0 + k - 1, k + idle / m)


def rank(n: int, q: float) -> int:
    """How many agents finish by the q-quantile, as the bench's percentile picks it (1-based)."""
    return min(n, max(0, round(q * (n - 1)))) + 1


def floor(n: int, q: float, k: int, c: float) -> float:
    """The q-quantile's floor in multiples of S/B, for n agents, k pieces, origin cap c x B."""
    return floor_ticks(n, rank(n, q), k, c) / k
