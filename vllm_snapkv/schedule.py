"""When a request compacts, and what it keeps: a pure function both sides evaluate.

The paged cache keeps ``num_computed_tokens`` at its true value; only what attention *reads*
shrinks. A request's cache is the logical slots ``[0, L)`` of its blocks (``L`` = tokens
processed). At any moment attention reads ``[E, L)``: the first ``E`` slots — a whole number of
blocks — have been evicted and their blocks returned to the pool.

A **compaction** ``c`` happens once ``c.at`` tokens are processed (in the engine step that
processes token ``c.at - 1``, after that step's attention): the method ranks the attended slots
``[c.prior, c.at)``, each KV head keeps ``c.kept = c.at - c.evicted`` of them (the last
``window`` always among them, in place), and they move into slots ``[c.evicted, c.at)``. Blocks
``[c.prior / bs, c.evicted / bs)`` are then freed. ``evicted`` is a multiple of the block size,
grows from one compaction to the next, and is computed by rounding *down*, so a compaction keeps
the budget or up to one block more, never less.

A request's :class:`Schedule` lists its compactions, in three phases:

* **prefill** (``prefill_budget`` P, ``prefill_interval`` C): while a long prompt is read,
  whenever the attended part reaches ``P + C`` tokens, keep ``P``: at ``P + kC`` for
  ``k = 1, 2, ...`` while that is before the prompt's end, evicting ``kC``. The prompt is never
  held whole.
* **prompt** (``budget``/``ratio``): at the prompt's end ``N``, keep the target
  ``t = kept_count(N)``: ``E = floor((N - t) / bs) * bs`` — the placement the plugin started
  with. Left out when it would free no block. With ``prompt_at = a < N`` (the request's
  ``compact_at``) it runs at ``a`` instead, on the context before the question:
  ``E = floor((a - t) / bs) * bs`` with ``t = kept_count(a)``; the prompt's last ``N - a``
  tokens are then read on top of the kept ones and never evicted by it, and the prefill phase
  stops before ``a``.
* **decode** (``decode_budget`` B, ``decode_interval`` S, a multiple of the block size): whenever
  the attended KV reaches ``B + S`` tokens during generation, keep ``B`` (the first one, if the
  prompt is still larger than that after its own compaction, right after the first generated
  token). Each later compaction evicts exactly ``S`` tokens and keeps exactly ``B``, so a request
  holds at most ``ceil((B + S) / bs)`` blocks plus the one a new token opens.

Everything here is a pure function of (prompt length, settings, block size) and of the number
of tokens processed, so the scheduler (which frees blocks and caps prefill chunks at compaction
points) and every worker (which compacts and shifts the attention metadata) evaluate it
independently and agree without a channel. A preempted request starts over from 0 tokens and
meets the same compactions again.

**Under pressure** (``trigger="pressure"``) the prompt and decode budgets are ceilings, not
points: the prompt and decode phases above do not run by themselves. The scheduler *orders* a
compaction when its pool runs short (:meth:`Schedule.pressure_order`), and the schedule is then
a pure function of (prompt length, settings, block size, the orders so far): each ordered point
``a`` keeps ``t(a)`` — the prompt target when ``a`` is the prompt's compaction point, else the
decode budget (or, without one, the prompt target) — with ``E = floor((a - t) / bs) * bs``. The
orders are the one thing the scheduler has to tell the workers (the connector's metadata); they
stay with the request, so a preempted request recomputes through the same compactions. The
prefill phase, which is what lets a prompt larger than the pool be read at all, stays scheduled.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

__all__ = ["PHASES", "REASONS", "TRIGGERS", "Compaction", "Schedule", "round_to_blocks"]

#: Compaction phases, in the order a request meets them.
PHASES: tuple[str, ...] = ("prefill", "prompt", "decode")
#: Why a compaction runs: its place in the schedule, or the scheduler's order under pressure.
REASONS: tuple[str, ...] = ("schedule", "pressure")
#: When the prompt and decode budgets apply: at their points (``always``), or only when the
#: scheduler runs short of blocks (``pressure``).
TRIGGERS: tuple[str, ...] = ("always", "pressure")


def round_to_blocks(tokens: int, block_size: int) -> int:
    """``tokens`` rounded up to a whole number of blocks (at least one block)."""
    return max(block_size, -(-tokens // block_size) * block_size)


@dataclass(frozen=True)
class Compaction:
    """One compaction of one request.

    Attributes:
        at: it runs once this many tokens are processed (after the step processing token
            ``at - 1``).
        prior: slots ``[0, prior)`` were evicted before it; it ranks slots ``[prior, at)``.
        evicted: slots ``[0, evicted)`` are evicted after it (a multiple of the block size).
        phase: ``"prefill"``, ``"prompt"`` or ``"decode"``.
        method: the method that ranks the slots.
        reason: ``"schedule"`` or ``"pressure"`` (ordered by the scheduler).
    """

    at: int
    prior: int
    evicted: int
    phase: str
    method: str
    reason: str = "schedule"

    @property
    def kept(self) -> int:
        """Slots each KV head keeps: ``at - evicted``."""
        return self.at - self.evicted

    @property
    def attended(self) -> int:
        """Slots ranked: ``at - prior``."""
        return self.at - self.prior

    def freed_blocks(self, block_size: int) -> int:
        """Blocks this compaction returns to the pool."""
        return (self.evicted - self.prior) // block_size


@dataclass(frozen=True)
class Schedule:
    """The compactions of one request (see the module docstring).

    Attributes:
        prompt_len: N.
        block_size: tokens per KV block.
        method: the request's method (prompt and decode compactions).
        prompt_target: tokens per KV head kept by the prompt compaction (``None``: none).
        prompt_at: where the prompt compaction runs (``None``: the prompt's end ``N``; else
            ``1 <= prompt_at <= N``).
        prefill_budget / prefill_interval / prefill_method: the prefill phase (``None`` budget:
            off).
        decode_budget / decode_interval: the decode phase (``None`` budget: off).
        trigger: ``"always"`` (the phases above) or ``"pressure"`` (prompt and decode budgets are
            ceilings that apply at the scheduler's :attr:`orders`).
        orders: under ``pressure``, the points the scheduler ordered compactions at, ascending.
    """

    prompt_len: int
    block_size: int
    method: str
    prompt_target: int | None = None
    prompt_at: int | None = None
    prefill_budget: int | None = None
    prefill_interval: int = 0
    prefill_method: str = ""
    decode_budget: int | None = None
    decode_interval: int = 0
    trigger: str = "always"
    orders: tuple[int, ...] = ()
    _finite: tuple[Compaction, ...] = field(init=False, repr=False, compare=False)
    _finite_at: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, bs = self.prompt_len, self.block_size
        if n < 0 or bs < 1:
            raise ValueError(f"bad schedule sizes: prompt_len={n}, block_size={bs}")
        for name in ("prefill_interval", "decode_interval"):
            budget = getattr(self, name.replace("interval", "budget"))
            value = getattr(self, name)
            if budget is not None and (value < bs or value % bs):
                raise ValueError(f"{name}={value} must be a positive multiple of the block "
                                 f"size ({bs})")
        point = n if self.prompt_at is None else self.prompt_at
        if self.prompt_at is not None and not 1 <= point <= n:
            raise ValueError(f"prompt_at={self.prompt_at} must be in [1, {n}]")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger={self.trigger!r} must be one of {TRIGGERS}")
        if self.orders and (self.trigger != "pressure" or any(
                b <= a for a, b in zip(self.orders, self.orders[1:])) or self.orders[0] < 1):
            raise ValueError(f"orders={self.orders} need trigger='pressure' and must ascend")
        events: list[Compaction] = []
        evicted = 0
        if self.prefill_budget is not None:
            p, c = self.prefill_budget, self.prefill_interval
            for k in range(1, max(0, (point - 1 - p) // c) + 1):
                events.append(Compaction(p + k * c, evicted, k * c, "prefill",
                                         self.prefill_method or self.method))
                evicted = k * c
        if self.trigger == "pressure":
            for a in self.orders:
                c = self._ordered(a, evicted)
                if c is not None and (not events or a > events[-1].at):
                    events.append(c)
                    evicted = c.evicted
            object.__setattr__(self, "_finite", tuple(events))
            object.__setattr__(self, "_finite_at", tuple(c.at for c in events))
            return
        if self.prompt_target is not None and self.prompt_target < point:
            e = (point - self.prompt_target) // bs * bs
            if e > evicted:
                events.append(Compaction(point, evicted, e, "prompt", self.method))
                evicted = e
        if self.decode_budget is not None:
            b, s = self.decode_budget, self.decode_interval
            at = max(evicted + b + s, n + 1)
            e = (at - b) // bs * bs
            events.append(Compaction(at, evicted, e, "decode", self.method))
        object.__setattr__(self, "_finite", tuple(events))
        object.__setattr__(self, "_finite_at", tuple(c.at for c in events))

    # -------------------------------------------------------------------------- lookups

    @property
    def compresses(self) -> bool:
        """Whether the request ever compacts (whatever its output length); under ``pressure``,
        whether it may (a prompt or decode ceiling exists)."""
        if self.trigger == "pressure":
            return bool(self._finite) or self.prompt_target is not None \
                or self.decode_budget is not None
        return bool(self._finite)

    # -------------------------------------------------------------------------- pressure

    @property
    def point(self) -> int:
        """Where the prompt compaction runs: ``prompt_at``, else the prompt's end."""
        return self.prompt_len if self.prompt_at is None else self.prompt_at

    def _ordered(self, at: int, prior: int) -> Compaction | None:
        """The compaction an order at ``at`` makes after ``prior`` slots were evicted (``None``:
        it would free no block)."""
        if at <= self.prompt_len:  # the prompt's compaction point, or inside the prompt
            target = self.prompt_target
        else:
            target = self.decode_budget if self.decode_budget is not None else self.prompt_target
        if target is None:
            return None
        evicted = (at - target) // self.block_size * self.block_size
        if evicted <= prior:
            return None
        phase = "prompt" if at == self.point else "decode" if at > self.prompt_len else "prefill"
        return Compaction(at, prior, evicted, phase, self.method, "pressure")

    def pressure_order(self, processed: int, window: int) -> Compaction | None:
        """The compaction the scheduler can order for this request now, ``processed`` tokens
        in, or ``None`` (not under pressure, a compaction already pending, or none would free a
        block).

        It runs at the prompt's compaction point when the whole observation window is still
        ahead (``processed + window <= point``), else ``window`` tokens ahead: the window's
        queries are then all computed after the order, so the workers stash them as for any
        scheduled compaction."""
        if self.trigger != "pressure" or window < 1:
            return None
        if self.next_after(processed) is not None:
            return None
        at = self.point if processed + window <= self.point else processed + window
        return self._ordered(at, self.evicted_at(processed))

    def with_order(self, at: int) -> Schedule:
        """This schedule with one more ordered compaction at ``at``."""
        return replace(self, orders=(*self.orders, at))

    @property
    def first(self) -> Compaction | None:
        """The first compaction (``None`` when there is none)."""
        return self._finite[0] if self._finite else None

    @property
    def prompt_compaction(self) -> Compaction | None:
        """The prompt compaction (at the prompt's end or at ``prompt_at``), if any."""
        for c in self._finite:
            if c.phase == "prompt":
                return c
        return None

    @property
    def cache_limit(self) -> int | None:
        """Slots below this are never rewritten (the first compaction's eviction), so only
        blocks below it may be hashed for prefix caching or reused from it; ``None``: no
        limit (the request never compacts)."""
        return self._finite[0].evicted if self._finite else None

    @property
    def _periodic(self) -> bool:
        """Whether the last finite compaction opens an endless periodic decode phase."""
        return self.decode_budget is not None and self.trigger == "always"

    @property
    def idle(self) -> bool:
        """No compaction at any length (under pressure: none ordered and no prefill phase), so
        a step has nothing to plan for the request: callers on the per-step path skip it."""
        return not self._finite_at and not self._periodic

    def _decode(self, j: int) -> Compaction:
        """The j-th decode compaction, j >= 1 (closed form after the first)."""
        first = self._finite[-1]
        if j == 1:
            return first
        s, b = self.decode_interval, self.decode_budget
        assert b is not None
        e = first.evicted + (j - 1) * s
        return Compaction(e + b, e - s, e, "decode", self.method)

    def _decode_index(self, processed: int) -> int:
        """How many decode compactions have ``at <= processed`` (decode phase on)."""
        first = self._finite[-1]
        if processed < first.at:
            return 0
        second_at = first.evicted + self.decode_budget + self.decode_interval  # type: ignore[operator]
        if processed < second_at:
            return 1
        return 2 + (processed - second_at) // self.decode_interval

    def _count_at_most(self, processed: int) -> int:
        """Number of compactions with ``at <= processed``."""
        finite = bisect.bisect_right(self._finite_at, processed)
        if not self._periodic or finite < len(self._finite):
            return finite
        return len(self._finite) - 1 + self._decode_index(processed)

    def _nth(self, i: int) -> Compaction:
        """The i-th compaction (0-based)."""
        if i < len(self._finite) - (1 if self._periodic else 0):
            return self._finite[i]
        if not self._periodic:
            raise IndexError(i)
        return self._decode(i - len(self._finite) + 2)

    def evicted_at(self, processed: int) -> int:
        """Slots evicted once ``processed`` tokens are processed (what attention skips)."""
        count = self._count_at_most(processed)
        return self._nth(count - 1).evicted if count else 0

    def compactions_done(self, processed: int) -> int:
        """How many compactions have run once ``processed`` tokens are processed."""
        return self._count_at_most(processed)

    def next_after(self, processed: int) -> Compaction | None:
        """The first compaction with ``at > processed`` (``None``: no more)."""
        count = self._count_at_most(processed)
        if not self._periodic and count >= len(self._finite):
            return None
        return self._nth(count)

    def between(self, lo: int, hi: int) -> list[Compaction]:
        """Compactions with ``lo < at <= hi``, in order (those of one engine step that
        processes tokens ``[lo, hi)``)."""
        out = []
        i = self._count_at_most(lo)
        end = self._count_at_most(hi)
        while i < end:
            out.append(self._nth(i))
            i += 1
        return out

    def compactions(self, up_to: int) -> Iterator[Compaction]:
        """All compactions with ``at <= up_to``."""
        return iter(self.between(-1, up_to))

    # -------------------------------------------------------------------------- bounds

    def max_held_blocks(self, total_tokens: int) -> int:
        """Most blocks the request holds while processing ``total_tokens`` tokens (prompt and
        output), with compactions as scheduled and prefill chunks ending at compaction points:
        the largest ``ceil(L / bs) - E / bs`` over the moments just before each compaction and
        at the end. (A step may also open the block of the next token: one more.)"""
        bs = self.block_size
        worst = 0
        for c in self.compactions(total_tokens):
            worst = max(worst, -(-c.at // bs) - c.prior // bs)
        end_e = self.evicted_at(total_tokens)
        return max(worst, -(-total_tokens // bs) - end_e // bs)
