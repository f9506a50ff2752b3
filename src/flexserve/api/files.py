"""The Files API (OpenAI's contract): upload, list, retrieve, content, delete.

An upload is parsed as a stream: starlette spools the multipart body to a temporary file
(bounded memory), and the batch checks run over it in 1 MB blocks while it is stored.
Another tenant's file is a 404, exactly like a missing one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from flexserve.api.auth import authenticate
from flexserve.api.state import AppState, app_state
from flexserve.batch.lines import MAX_FILE_BYTES
from flexserve.batch.service import BatchService
from flexserve.errors import InvalidRequest, NotFound, RequestTooLarge
from flexserve.store.batch_records import FileRecord

MULTIPART_OVERHEAD = 64 * 1024
MAX_LIST = 100
"""OpenAI's largest page."""


def batch_service(state: AppState) -> BatchService:
    if state.batches is None:
        raise NotFound("Files and batches need a SQL store (SQLite or PostgreSQL).")
    return state.batches


async def create_file(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    declared = request.headers.get("content-length")
    if not declared or not declared.isdigit():  # a chunked body could not be bounded
        raise InvalidRequest("Send uploads with a Content-Length header (not chunked).")
    if int(declared) > MAX_FILE_BYTES + MULTIPART_OVERHEAD:
        raise RequestTooLarge(f"Files may be at most {MAX_FILE_BYTES // (1024 * 1024)} MB.")
    form = await _form(request)
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        record = await asyncio.to_thread(
            service.upload, key.tenant, purpose, upload.filename or "upload.jsonl", upload.file
        )
    finally:
        await form.close()
    return JSONResponse(file_object(record))


async def _form(request: Request) -> Any:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("Upload files as multipart/form-data with 'file' and 'purpose'.")
    try:
        return await request.form(max_files=1, max_fields=8)
    except Exception as error:  # starlette's MultiPartException and malformed bodies
        raise InvalidRequest(f"The multipart body could not be parsed: {error}") from None


async def list_files(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    limit = page_limit(request)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    records = await asyncio.to_thread(
        service.store.list_files,
        key.tenant,
        request.query_params.get("purpose"),
        request.query_params.get("after"),
        limit + 1,
        order == "desc",
    )
    return JSONResponse(page([file_object(r) for r in records], limit))


async def get_file(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    file_id = request.path_params["file_id"]
    record = await asyncio.to_thread(batch_service(state).file, key.tenant, file_id)
    return JSONResponse(file_object(record))


async def file_content(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    service = batch_service(state)
    record = await asyncio.to_thread(service.file, key.tenant, request.path_params["file_id"])
    # A sync iterator: starlette reads it in a thread, a chunk at a time.
    return StreamingResponse(
        service.store.file_content(record.file_id), media_type="application/octet-stream"
    )


async def delete_file(request: Request) -> Response:
    state = app_state(request)
    key = await authenticate(request, state)
    file_id = request.path_params["file_id"]
    service = batch_service(state)
    if not await asyncio.to_thread(service.store.delete_file, key.tenant, file_id):
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def file_object(record: FileRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.file_id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "error" if record.problem else "processed",
        "status_details": record.problem,
        "expires_at": None,
    }
    if record.purpose == "batch":  # beyond OpenAI: what batches.create will check
        body["batch_input"] = {
            "requests": record.line_count,
            "model": record.model,
            "endpoint": record.endpoint,
            "estimated_tokens": record.estimated_tokens,
            "problem": record.problem,
        }
    return body


def page(objects: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's list object: `limit` items, `has_more` if there was one more."""
    shown = objects[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(objects) > limit,
    }


def page_limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {MAX_LIST}.", param="limit")
    return int(raw)
