"""The HTTP service through FastAPI's TestClient: predictions, the page, and every kind of bad upload."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient's transport
with warnings.catch_warnings():
    # starlette 1.x asks for "httpx2", which is not on PyPI; httpx works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from alexnet.tools.predict import predict
from alexnet.tools.serve import create_app


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header declares width x height but whose data is tiny:
    the shape of a decompression bomb, without the memory it would take to decode one."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


NOISE = png_bytes(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.fixture
def client(tiny_checkpoint) -> TestClient:
    return TestClient(create_app(tiny_checkpoint, max_upload_bytes=200_000))


def test_predict_returns_the_same_top5_as_alexnet_predict(client, tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(png_bytes(image))
    response = client.post("/predict", files={"file": ("x.png", png_bytes(image), "image/png")})
    assert response.status_code == 200
    body = response.json()
    [expected] = predict(tiny_checkpoint, [str(tmp_path / "x.png")])
    assert [c["name"] for c in body["top"]] == [name for name, _ in expected.top]
    assert [c["id"] for c in body["top"]] == expected.classes
    np.testing.assert_allclose([c["probability"] for c in body["top"]], [p for _, p in expected.top], rtol=1e-6)
    assert (body["width"], body["height"]) == (44, 30)


def test_page_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="top5"' in page.text and 'fetch("predict"' in page.text
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "model": "paper",
        "classes": 6,
        "image_size": 32,
        "crop_size": 28,
        "max_upload_bytes": 200_000,
    }


def test_bad_uploads_get_clear_errors_and_the_server_stays_up(client):
    cases = [
        (b"this is not an image", 415, "not a decodable image"),
        (b"", 400, "empty"),
        (NOISE[: len(NOISE) // 2], 415, "not a decodable image"),  # truncated
        (png_claiming(9000, 9000), 413, "over the 64,000,000 limit"),  # 81 Mpx: our limit
        (png_claiming(30000, 30000), 413, "decompression bomb"),  # 900 Mpx: PIL's own guard
        (b"\0" * 300_000, 413, "200,000-byte limit"),  # too many bytes
    ]
    for data, status, message in cases:
        response = client.post("/predict", files={"file": ("upload.png", data, "image/png")})
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"]
    assert client.post("/predict").status_code == 422  # no file field: FastAPI's validation message
    ok = client.post("/predict", files={"file": ("x.png", png_bytes(np.full((32, 32, 3), 99, np.uint8)), "image/png")})
    assert ok.status_code == 200 and len(ok.json()["top"]) == 5


def test_body_limit_applies_to_chunked_uploads_too(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000  # 300 kB, no Content-Length

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert response.status_code == 413
    assert client.get("/health").status_code == 200
