"""How batch ingestion cuts a provider batch's output and error files into chunks (worker/batch.py
`_chunks`): the reading thread prepares one chunk while the writers write the ones before it."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

from tierbatch.worker.batch import _chunks


class _Files:
    """The provider's files as `ProviderBatches.iter_file_lines` reads them."""

    def __init__(self, files: dict[str, list[str]]) -> None:
        self.files = files

    def iter_file_lines(self, file_id: str) -> Iterator[str]:
        yield from self.files[file_id]


def _cut(files: dict[str, list[str]], output: str | None, errors: str | None, size: int) -> list[list[str]]:
    batch = SimpleNamespace(output_file_id=output, error_file_id=errors)
    return list(_chunks(cast(Any, _Files(files)), cast(Any, batch), size))


def test_the_first_chunk_is_a_fifth_so_a_writer_starts_early_and_every_line_comes_once_in_order() -> None:
    output = [f"out {i}" for i in range(2_350)]
    errors = [f"err {i}" for i in range(30)]
    chunks = _cut({"file-out": output, "file-err": errors}, "file-out", "file-err", 1_000)
    assert [len(chunk) for chunk in chunks] == [200, 1_000, 1_000, 150, 30]
    assert [line for chunk in chunks for line in chunk] == output + errors


def test_a_batch_whose_lines_are_all_errors_or_fewer_than_a_chunk() -> None:
    errors = [f"err {i}" for i in range(450)]
    assert [len(chunk) for chunk in _cut({"file-err": errors}, None, "file-err", 1_000)] == [200, 250]
    assert _cut({"file-out": ["one line"]}, "file-out", None, 1_000) == [["one line"]]
    assert _cut({}, None, None, 1_000) == []
