"""The image cache's routes: `PUT /v1/images/{sha256}` sends an image once, prompts then name it."""

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from protocol import API_PREFIX, ErrorCode, image_sha256
from server.errors import APIError
from server.images import ImageError
from server.routes.deps import auth

router = APIRouter(dependencies=[Depends(auth)])


@router.put(API_PREFIX + "/images/{sha256}", status_code=201)
async def put_image(sha256: str, request: Request):
    config, images = request.app.state.config, request.app.state.images
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise APIError(400, ErrorCode.invalid_request, "the path must be the image's lowercase hex sha256")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_image_bytes:
        raise APIError(413, ErrorCode.too_large, f"image is {int(declared):,} bytes; the server accepts up to "
                       f"{config.max_image_bytes:,} (see --max-image-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > config.max_image_bytes:
            raise APIError(413, ErrorCode.too_large,
                           f"image is over {config.max_image_bytes:,} bytes (see --max-image-bytes)")
    data = bytes(body)
    if image_sha256(data) != sha256:
        raise APIError(400, ErrorCode.invalid_image,
                       f"the body's sha256 is {image_sha256(data)}, not the {sha256} in the path")
    try:
        _, img = await asyncio.to_thread(images.add_bytes, data, f"image {sha256[:12]}",
                                         config.max_image_bytes, config.max_pixels)
    except ImageError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
    return {"sha256": sha256, "width": img.width, "height": img.height}


@router.head(API_PREFIX + "/images/{sha256}")
async def head_image(sha256: str, request: Request):
    return Response(status_code=200 if sha256 in request.app.state.images else 404)
