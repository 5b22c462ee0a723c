"""Stored files of the OpenAI-compatible `/v1/files` facade, their content in ordered parts."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, Text
from sqlalchemy.orm import Mapped, mapped_column

from tierbatch.db.models.base import Base, now_column


class StoredFile(Base):
    """A file of the `/v1/files` facade: batch input files uploaded by a tenant, the output and error
    files assembled for its batches, and data files (`user_data`) a schedule's source reads. The
    content lives in `file_parts`, in order."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("purpose IN ('batch', 'batch_output', 'user_data')", name="purpose_known"),
        Index("ix_files_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # "file-" + 24 hex digits
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    purpose: Mapped[str] = mapped_column(Text, nullable=False)
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    line_count: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = now_column()


class FilePart(Base):
    """One chunk (up to 1 MiB) of a stored file's content; `part` orders them from 0."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)

