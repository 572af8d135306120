"""The settle backlog: finished calls whose settle found the ledger unavailable.

The provider billed them, so their spend is kept (not lost when the hold expires) and
settled before the next model call, by :meth:`Guard.settle_pending` and on close. A
settle is idempotent and counts after its lease too, so settling one twice is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from ..errors import LedgerUnavailable
from ..ledger import Reservation
from ..ledger.base import Settlement
from .drive import Op, Steps

__all__ = ["Backlog"]

logger = logging.getLogger("agent_guard")


class Backlog:
    """Unsettled (reservation, amounts) in the order they finished; its own lock."""

    def __init__(self) -> None:
        self._items: deque[tuple[Reservation, dict[str, int]]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, reservation: Reservation, amounts: dict[str, int],
             exc: LedgerUnavailable) -> None:
        """The call ran and the provider billed it, but the settle found the ledger
        unavailable: keep it to settle later rather than lose it (its hold would expire
        and the spend would never be counted)."""
        with self._lock:
            self._items.append((reservation, amounts))
        logger.error("agent-guard: a finished call's spend could not be settled (%s); "
                     "it is kept and settled before the next call (%d pending)",
                     exc, len(self._items))

    def _pop(self, reservation: Reservation) -> None:
        with self._lock:
            if self._items and self._items[0][0] is reservation:
                self._items.popleft()

    def settle(self, noted: Callable[[Settlement], None]) -> Steps[bool]:
        """Settle the backlog in order, then land the settles the ledger deferred
        (Redis); ``noted`` sees each settlement. True when none is left."""
        while self._items:
            reservation, amounts = self._items[0]
            try:
                noted((yield Op("settle", reservation, amounts)))
            except LedgerUnavailable:
                return False
            self._pop(reservation)
        try:
            yield Op("flush")
        except LedgerUnavailable:
            return False
        return True
