"""An HTTP request body -> the preprocessed image crop, or a 4xx answer with a JSON message.

``POST /predict`` takes the image as the raw body (any content type but multipart) or as a multipart upload
in the field ``image``. This runs in the HTTP server processes, as a FastAPI dependency of the endpoint
LitServe registers (``ImageUpload``, the annotation of ``ClassifierAPI.decode_request``): a bad upload is
answered there (400 undecodable, 413 too many bytes or pixels, 422 no ``image`` field) and never reaches
an inference worker, whose batch it would otherwise fail as a whole. Decoding and resizing run in the
server's thread pool, in parallel with the model in the inference worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, AsyncIterator

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from pvt_lightning.serve.preprocess import ImagePipeline, ImageRejected

FIELD = "image"
DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
STATE_KEY = "pvt_lightning_upload"
"""Where the app's ``state`` holds the ``UploadSettings`` (set in the main process, inherited by the forked
HTTP server processes)."""


@dataclass
class UploadSettings:
    pipeline: ImagePipeline
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is over ``max_bytes`` (declared or received)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, max_bytes: int) -> HTTPException:
    return HTTPException(413, f"the upload is {'over ' if size > max_bytes else ''}{size / 2**20:.1f} MiB, over the "
                              f"server's limit of {max_bytes / 2**20:.1f} MiB (--max-upload-mb)")


async def multipart_image(request: Request, body: bytes) -> tuple[bytes, str]:
    """The bytes and file name of the ``image`` field of a multipart body."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body
        yield b""

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPException(400, f"malformed multipart body: {err.message}") from None
    try:
        upload = form.get(FIELD)
        if upload is None:
            raise HTTPException(422, f"no '{FIELD}' field in the multipart upload (fields: {', '.join(form.keys())}); "
                                     f"send the file as {FIELD}=@photo.jpg")
        if isinstance(upload, str):
            raise HTTPException(422, f"the '{FIELD}' field is text; send the image as a file part "
                                     f"({FIELD}=@photo.jpg)")
        return await upload.read(), upload.filename or "upload"
    finally:
        await form.close()


async def read_image(request: Request) -> dict:
    """FastAPI dependency: the request's image as ``{"image": uint8 (3, H, W) array, "name": str}``."""
    settings: UploadSettings = getattr(request.app.state, STATE_KEY)
    body = await read_body(request, settings.max_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        data, name = await multipart_image(request, body)
    else:
        data, name = body, "upload"
    try:
        crop = await run_in_threadpool(settings.pipeline, data, name)
    except ImageRejected as err:
        raise HTTPException(err.status, str(err)) from None
    return {"image": crop, "name": name}


ImageUpload = Annotated[dict, Depends(read_image)]
"""The type ``decode_request`` declares for its ``request``: LitServe gives it to the endpoint it registers,
so FastAPI runs ``read_image`` and the worker receives its (picklable) result."""
