"""Counting what a transaction did once it committed: a rolled-back transition or ledger row is not counted.

Domain functions take a session and never commit; they hand their increments to `after_commit`, and
the session runs them after its outermost transaction commits (or drops them on rollback). A savepoint
rolled back inside a committed transaction still counts what it had recorded: no path here uses one
around a counted write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger(__name__)

_PENDING = "tierbatch.metrics.pending"


def after_commit(session: Session, record: Callable[[], None]) -> None:
    """Run `record` once `session`'s transaction commits; never if it rolls back."""
    session.info.setdefault(_PENDING, []).append(record)


@event.listens_for(Session, "after_commit")
def _run_pending(session: Session) -> None:
    for record in session.info.pop(_PENDING, ()):
        try:
            record()
        except Exception:  # a metric must never fail the work it counts
            log.warning("could not record a metric", exc_info=True)


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended without its commit having run them (a rollback, also one with no
    statement sent, or a close): they never happened."""
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
