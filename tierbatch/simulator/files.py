"""The `/v1/files` routes: uploads streamed to the file store's directory (`file_store.py`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from tierbatch.simulator.errors import OpenAIError, bad_request
from tierbatch.simulator.state import sim_state

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024


def _copy_limited(src: IO[bytes], dest: Path, limit: int) -> int:
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                raise ValueError("too large")
            out.write(chunk)
    return written


async def create_file(request: Request) -> dict[str, Any]:
    state = sim_state(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request("The request must be multipart/form-data with a 'file' and a 'purpose'.", "file")
    async with request.form(max_files=1, max_fields=16) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose is None or purpose == "":
            raise OpenAIError(400, "Missing required parameter: 'purpose'.", "invalid_request_error",
                              "purpose", "missing_required_parameter")
        if purpose != "batch":
            raise OpenAIError(400, f"Invalid value for 'purpose': '{purpose}'. The simulator accepts only "
                              "'batch'.", "invalid_request_error", "purpose", "invalid_value")
        if not isinstance(upload, UploadFile):
            raise OpenAIError(400, "Missing required parameter: 'file'.", "invalid_request_error", "file",
                              "missing_required_parameter")
        filename = upload.filename or "upload.jsonl"
        if not filename.endswith(".jsonl"):
            raise OpenAIError(400, "Invalid file format for Batch API. Must be .jsonl",
                              "invalid_request_error", "file", "invalid_file_format")
        file_id = state.files.new_id()
        path = state.files.path_for(file_id)
        try:
            await asyncio.to_thread(_copy_limited, upload.file, path, MAX_UPLOAD_BYTES)
        except ValueError:
            path.unlink(missing_ok=True)
            raise OpenAIError(413, f"File is too large: the limit is {MAX_UPLOAD_BYTES} bytes.",
                              "invalid_request_error", "file", "file_too_large") from None
    stored = state.files.add(file_id, filename, "batch", path)
    state.stats.files_created += 1
    return stored.as_dict()


async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    return sim_state(request).files.require(file_id).as_dict()


async def file_content(request: Request, file_id: str) -> FileResponse:
    stored = sim_state(request).files.require(file_id)
    return FileResponse(stored.path, media_type="application/octet-stream", filename=stored.filename)


async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    stored = sim_state(request).files.delete(file_id)
    return {"id": stored.id, "object": "file", "deleted": True}


async def list_files(request: Request) -> dict[str, Any]:
    files = sim_state(request).files
    return {"object": "list", "data": [f.as_dict() for f in files.all()], "has_more": False}


def files_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/files", create_file, methods=["POST"])
    router.add_api_route("/v1/files", list_files, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}", retrieve_file, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}/content", file_content, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"])
    return router
