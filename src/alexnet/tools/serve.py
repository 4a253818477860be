"""``alexnet serve``: a FastAPI app with a JSON prediction endpoint and a one-page upload UI.

* ``POST /predict`` -- a multipart upload (field ``file``) -> ``{"top": [{"name", "id",
  "probability"}, ...], "width", "height"}``, the top-5 of the centre patch, as
  ``alexnet predict`` computes it.
* ``GET /`` -- one HTML page (inline JS, no external assets) that uploads an image, shows
  it, and lists its top-5 classes with bars.
* ``GET /health`` -- the model's name, class count and input sizes.

Bad input is answered, never fatal: a body over the upload limit gets 413 before it is
read into the app (:class:`BodyLimit`), an image over the pixel limit or a decompression
bomb (a small file declaring huge dimensions, refused from its header by
``data.load_image``) gets 413, and anything that does not decode as an image gets 415;
each with a ``detail`` message. Inference is serialised by a lock: concurrent forward
passes would only compete for the same CPU cores or GPU. Decoding is bounded too: at most
``max_decoding`` uploads (default :data:`DECODE_SLOTS`) are decoded at once, so a burst of
small files that decode to large images (a 62 KB PNG of 8000x8000 pixels) cannot add up.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image

from alexnet.checkpoint import load_model
from alexnet.data.images import BadImage, ImageTooLarge, load_image
from alexnet.evaluate import predict_probs
from alexnet.tools.predict import top_classes

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
# Uploads decoded at once. data.load_image refuses images over MAX_IMAGE_PIXELS (64 Mpx)
# from their header, so one decode holds at most 64 Mpx x 3 bytes = 192 MB of RGB pixels
# (plus its resized copy, at most as large); two slots bound decoding to about 2 x 384 MB
# = 768 MB however many requests arrive at once (FastAPI's thread pool runs up to 40).
DECODE_SLOTS = 2
MULTIPART_OVERHEAD = 16 * 2**10  # boundaries and part headers around the file's bytes


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether the size
    is declared (Content-Length) or only found while reading (chunked), so that an
    oversized upload is never handed to the app or spooled to disk."""

    def __init__(self, app: Any, max_bytes: int, limit_shown: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit_shown = limit_shown or max_bytes  # the file-size limit users are told about

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"upload over the {self.limit_shown:,}-byte limit"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def decode_upload(data: bytes, image_size: int, slots: threading.BoundedSemaphore) -> tuple[Any, int, int]:
    """Decode one upload as ``alexnet predict`` does, holding one of ``slots`` throughout:
    (the (size, size, 3) uint8 image, width, height). Raises data.images' BadImage/ImageTooLarge."""
    with slots:
        image = load_image(io.BytesIO(data), image_size)
        with Image.open(io.BytesIO(data)) as probe:  # decoded above, so within the pixel limit
            width, height = probe.size
    return image, width, height


def create_app(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    topk: int = 5,
    max_decoding: int = DECODE_SLOTS,
) -> FastAPI:
    loaded = load_model(checkpoint, device)
    lock = threading.Lock()
    decode_slots = threading.BoundedSemaphore(max_decoding)
    model_name = loaded.config.get("model", {}).get("name", "alexnet")
    info = {
        "status": "ok",
        "model": model_name,
        "classes": len(loaded.classes),
        "image_size": loaded.preprocess.image_size,
        "crop_size": loaded.preprocess.crop_size,
        "max_upload_bytes": max_upload_bytes,
    }
    app = FastAPI(title="alexnet", description=f"AlexNet ({model_name}) top-{topk} classification", version="1")
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD, limit_shown=max_upload_bytes)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/health")
    def health() -> dict[str, Any]:
        return info

    @app.post("/predict")
    def predict(file: Annotated[UploadFile, File(description="an image file")]) -> dict[str, Any]:
        # A plain def: FastAPI runs it in its thread pool, off the event loop.
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload over the {max_upload_bytes:,}-byte limit")
        if not data:
            raise HTTPException(400, "the upload is empty")
        try:
            image, width, height = decode_upload(data, loaded.preprocess.image_size, decode_slots)
        except ImageTooLarge as e:
            raise HTTPException(413, f"image refused: {e}") from None
        except BadImage as e:
            raise HTTPException(415, f"not a decodable image ({file.filename or 'upload'}): {e}") from None
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
        with lock, torch.no_grad():
            probs = predict_probs([loaded.model], [loaded.preprocess], batch, ten=False)[0].cpu()
        top, ids = top_classes(loaded, probs, topk)
        return {
            "top": [{"name": name, "id": cid, "probability": p} for (name, p), cid in zip(top, ids)],
            "width": width,
            "height": height,
        }

    return app


def serve(checkpoint: str | Path, host: str, port: int, device: str | torch.device, max_upload_bytes: int) -> None:
    import uvicorn

    uvicorn.run(create_app(checkpoint, device, max_upload_bytes), host=host, port=port, log_level="info")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AlexNet</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  #info { color: #666; font-size: .9rem; margin-top: 0; }
  #drop { border: 2px dashed #aaa; border-radius: 8px; padding: 1.2rem; text-align: center; }
  #drop.over { border-color: #36c; background: #f0f5ff; }
  #result { display: flex; gap: 1.5rem; margin-top: 1.5rem; align-items: flex-start; }
  #preview { width: 16rem; height: 16rem; object-fit: contain; image-rendering: pixelated; border-radius: 4px; display: none; }
  #top5 { list-style: none; padding: 0; margin: 0; flex: 1; }
  #top5 li { margin: .35rem 0; }
  .name { display: block; font-size: .95rem; }
  .track { background: #eee; height: .6rem; border-radius: 3px; }
  .bar { background: #36c; height: 100%; border-radius: 3px; }
  .prob { color: #555; font-size: .8rem; }
  #error { color: #b00; }
</style>
</head>
<body>
<h1>AlexNet</h1>
<p id="info">loading model information...</p>
<div id="drop">
  <input id="file" type="file" accept="image/*">
  <p>or drop an image here</p>
</div>
<p id="error" role="alert"></p>
<div id="result">
  <img id="preview" alt="uploaded image">
  <ol id="top5" aria-label="top-5 classes"></ol>
</div>
<script>
const $ = (id) => document.getElementById(id);
fetch("health").then((r) => r.json()).then((h) => {
  $("info").textContent = `${h.model} network, ${h.classes} classes, ${h.crop_size}px centre patch of a ${h.image_size}px image`;
});
async function classify(file) {
  $("error").textContent = "";
  $("top5").replaceChildren();
  $("top5").removeAttribute("data-done");
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("predict", { method: "POST", body: form });
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    $("preview").style.display = "none";
    $("error").textContent = `${response.status}: ${body.detail}`;
    return;
  }
  for (const c of body.top) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.name;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * c.probability).toFixed(1)}%`;
    track.append(bar);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(100 * c.probability).toFixed(1)}%` + (c.id !== c.name ? `  ${c.id}` : "");
    li.append(name, track, prob);
    $("top5").append(li);
  }
  $("top5").setAttribute("data-done", "1");
}
$("file").addEventListener("change", (e) => { if (e.target.files.length) classify(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
