"""Advisory locks that end with their transaction.

Session-level advisory locks are not used: through PgBouncer in transaction mode the unlock may run on
another server connection than the lock did, and the lock would stay held until that connection closes.
A transaction-level lock is released by the COMMIT or ROLLBACK that ends the work it guards, on whatever
server connection ran it.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session


def try_transaction_lock(connection: Connection | Session, key: str) -> bool:
    """Take the advisory lock `hashtextextended(key, 0)` until the current transaction ends, or return
    False at once when another transaction (or session) holds it."""
    return bool(connection.scalar(text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))"),
                                  {"key": key}))
