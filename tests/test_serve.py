"""`seqvision serve`: the API in process, a table of malformed uploads (never a 500), micro-batching and
concurrency, the load test on loopback, and the web page in a real browser."""
import asyncio
import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from seqvision import create_model  # noqa: E402
from seqvision.serve.app import Model, create_app  # noqa: E402
from seqvision.serve.batcher import MicroBatcher  # noqa: E402
from seqvision.weights import save_model  # noqa: E402

CLASSES = ["circle", "square", "triangle"]
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("sequencer2d_300k_28", num_classes=3)
    for p in model.parameters():  # the reference init zeroes the head: every answer would be a tie
        p.data.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_model(model, path, {"classes": json.dumps(CLASSES),
                             "data": json.dumps({"img_size": 28, "in_chans": 1, "mean": [0.5], "std": [0.25]})})
    return path


@pytest.fixture(scope="module")
def model(weights):
    return Model(str(weights), max_batch=8, max_wait_ms=20)


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, max_bytes=LIMIT))


def png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, format=fmt)
    return buf.getvalue()


def noise(seed: int, side: int = 28) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def direct(model: Model, data: bytes) -> torch.Tensor:
    from seqvision.data import open_image

    with torch.no_grad():
        return model.float_model(model.transform(open_image(data))[None]).softmax(-1)[0]


# The API ----------------------------------------------------------------------------------------------

def test_health_and_model(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["input_size"] == [1, 28, 28] and info["in_chans"] == 1
    assert info["int8"] is False and info["params"] == sum(p.numel() for p in create_model(
        "sequencer2d_300k_28", num_classes=3).parameters())


def test_predict_multipart_and_raw_answer_as_the_model_does(client, model):
    data = png(noise(1))
    want = direct(model, data)
    for r in (client.post("/predict", files={"file": ("x.png", data, "image/png")}),
              client.post("/predict", content=data, headers={"content-type": "image/png"})):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["top"][0]["label"] == CLASSES[int(want.argmax())]
        assert body["top"][0]["prob"] == pytest.approx(float(want.max()), abs=1e-5)
        assert [t["label"] for t in body["top"]] == [CLASSES[i] for i in want.argsort(descending=True)]
        assert body["model"] == "sequencer2d_300k_28" and body["latency_ms"] > 0


def test_batch_answers_each_file_in_order(client, model):
    images = [png(noise(s)) for s in range(5)]
    r = client.post("/predict/batch", files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == [f"{i}.png" for i in range(5)]
    for x, d in zip(results, images):
        assert x["top"][0]["prob"] == pytest.approx(float(direct(model, d).max()), abs=1e-5)


def test_explain_returns_an_overlay_png(client, model):
    r = client.post("/explain", files={"file": ("x.png", png(noise(2)), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == CLASSES[int(direct(model, png(noise(2))).argmax())]
    head, b64 = body["overlay"].split(",", 1)
    assert head == "data:image/png;base64"
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert overlay.shape == (224, 224, 3) and overlay.std() > 1


def test_int8_server_answers_like_the_float_model(weights):
    model = Model(str(weights), int8=True)
    r = TestClient(create_app(model)).post("/predict", content=png(noise(3)), headers={"content-type": "image/png"})
    assert r.status_code == 200 and model.info()["int8"] is True
    assert r.json()["top"][0]["label"] == CLASSES[int(direct(model, png(noise(3))).argmax())]


# Malformed uploads: a 4xx with a message, never a 500 ------------------------------------------------

def bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.stack([noise(4)] * 3, -1)).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(noise(s)) for s in (5, 6)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def tiff_float() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(7).astype(np.float32) / 255, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def palette_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.stack([noise(12)] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
    return buf.getvalue()


RAW = "image/png"
CASES = [  # (id, path, kwargs for client.post, status, words in the message)
    ("text/plain", "/predict", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "text/plain"),
    ("json", "/predict", dict(json={"image": "x"}), 415, "application/json"),
    ("no content type", "/predict", dict(content=b"\x89PNG"), 415, "(none)"),
    ("zero bytes raw", "/predict", dict(content=b"", headers={"content-type": RAW}), 400, "zero bytes"),
    ("zero-byte file", "/predict", dict(files={"file": ("e.png", b"", RAW)}), 400, "zero bytes"),
    ("not an image", "/predict", dict(content=b"plain words", headers={"content-type": RAW}), 400, "unreadable"),
    ("html as png", "/predict", dict(files={"file": ("p.png", b"<html></html>", RAW)}), 400, "p.png"),
    ("svg", "/predict", dict(content=b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                             headers={"content-type": "image/svg+xml"}), 400, "unreadable"),
    ("truncated png", "/predict", dict(content=png(noise(8))[:60], headers={"content-type": RAW}), 400, "unreadable"),
    ("truncated jpeg", "/predict", dict(content=png(noise(8), "JPEG")[:200], headers={"content-type": "image/jpeg"}),
     400, "unreadable"),
    ("decompression bomb", "/predict", dict(content=bomb(), headers={"content-type": RAW}), 400, "decompression bomb"),
    ("bomb as file", "/predict", dict(files={"file": ("b.png", bomb(), RAW)}), 400, "b.png"),
    ("too large", "/predict", dict(content=b"\0" * (LIMIT + 1), headers={"content-type": RAW}), 413, "limit"),
    ("too large multipart", "/predict", dict(files={"file": ("big.png", b"\0" * (LIMIT + 1), RAW)}), 413, "limit"),
    ("form without file", "/predict", dict(files={"name": (None, "x")}), 400, "no file"),
    ("url-encoded form", "/predict", dict(data={"name": "x"}), 415, "x-www-form-urlencoded"),
    ("two files to /predict", "/predict", dict(files=[("a", ("a.png", png(noise(1)), RAW)),
                                                      ("b", ("b.png", png(noise(2)), RAW))]), 400, "/predict/batch"),
    ("broken multipart", "/predict", dict(content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n",
                                          headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, None),
    ("multipart without boundary", "/predict", dict(content=b"abc", headers={"content-type": "multipart/form-data"}),
     400, "multipart"),
    ("batch without files", "/predict/batch", dict(files={"a": (None, "1")}), 400, "no file"),
    ("batch with a bad file", "/predict/batch", dict(files=[("f", ("ok.png", png(noise(1)), RAW)),
                                                            ("f", ("bad.png", b"junk", RAW))]), 400, "bad.png"),
    ("explain text", "/explain", dict(content=b"x", headers={"content-type": "text/plain"}), 415, "text/plain"),
    ("explain bomb", "/explain", dict(content=bomb(), headers={"content-type": RAW}), 400, "decompression bomb"),
    # Converted as predict converts them:
    ("16-bit png", "/predict", dict(content=png(noise(9).astype(np.uint16) * 257), headers={"content-type": RAW}),
     200, None),
    ("cmyk jpeg", "/predict", dict(content=cmyk_jpeg(), headers={"content-type": "image/jpeg"}), 200, None),
    ("rgba png", "/predict", dict(content=png(np.dstack([noise(1)] * 4)), headers={"content-type": RAW}), 200, None),
    ("palette png", "/predict", dict(content=palette_png(), headers={"content-type": RAW}), 200, None),
    ("animated gif", "/predict", dict(content=gif(), headers={"content-type": "image/gif"}), 200, None),
    ("float tiff", "/predict", dict(content=tiff_float(), headers={"content-type": "image/tiff"}), 200, None),
    ("1x1 image", "/predict", dict(content=png(np.zeros((1, 1), np.uint8)), headers={"content-type": RAW}), 200, None),
    ("octet-stream", "/predict", dict(content=png(noise(1)), headers={"content-type": "application/octet-stream"}),
     200, None),
]


@pytest.mark.parametrize("path,kwargs,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_upload(client, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    if status != 200:
        assert words is None or words in r.json()["detail"], r.json()
    else:
        assert r.json()["top"][0]["label"] in CLASSES


def test_wrong_method_is_405_not_500(client):
    assert client.get("/predict").status_code == 405


# Micro-batching and concurrency ------------------------------------------------------------------------

def test_batcher_groups_concurrent_inputs_and_keeps_rows_apart():
    calls = []

    def slow_double(x):
        calls.append(len(x))
        time.sleep(0.02)
        return x * 2
    b = MicroBatcher(slow_double, max_batch=4, max_wait_ms=50)
    futures = [b.submit(torch.full((3,), float(i))) for i in range(10)]
    assert [f.result(5)[0].item() for f in futures] == [2.0 * i for i in range(10)]
    b.close()
    assert max(calls) == 4 and sum(calls) == 10  # grouped, never above the bound


def test_batcher_failure_fails_its_requests_and_the_worker_lives_on():
    b = MicroBatcher(lambda x: x if x.shape[1] == 2 else 1 / 0, max_batch=2, max_wait_ms=1)
    with pytest.raises(ZeroDivisionError):
        b.submit(torch.zeros(3)).result(5)
    assert b.submit(torch.zeros(2)).result(5).tolist() == [0.0, 0.0]
    b.close()


def test_model_is_correct_when_threads_call_it_at_once(model):
    """The native kernel's per-thread buffers (and the inference scratch) under concurrent callers."""
    xs = [torch.randn(n, 1, 28, 28) for n in (1, 3, 5, 7, 2, 4, 6, 8)]
    with torch.no_grad():
        serial = [model.float_model(x) for x in xs]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                concurrent = list(pool.map(lambda x: model.float_model(x), xs))
                for a, b in zip(serial, concurrent):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(weights):
    model = Model(str(weights), max_batch=8, max_wait_ms=50)
    app = create_app(model)
    images = [png(noise(100 + i)) for i in range(16)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/predict", content=d, headers={"content-type": RAW})
                                          for d in images))
    responses = asyncio.run(go())
    for r, d in zip(responses, images):
        assert r.status_code == 200
        assert r.json()["top"][0]["prob"] == pytest.approx(float(direct(model, d).max()), abs=1e-5)
    assert max(model.batcher.batch_sizes) > 1 and max(model.batcher.batch_sizes) <= 8


# A real server on loopback: the load test and the browser ----------------------------------------------

@pytest.fixture(scope="module")
def server(model):
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_load_test_reports_and_has_no_errors(server, capsys):
    from seqvision.cli import main

    assert main(["serve-bench", "--url", server, "--requests", "24", "--concurrency", "1", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["errors"] == 0 and r["req_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)


def test_page_in_a_real_browser(server, model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shoe.png"
    image.write_bytes(png(noise(11)))
    want = CLASSES[int(direct(model, image.read_bytes()).argmax())]
    browser = _browser()
    try:
        browser.get(server + "/")
        WebDriverWait(browser, 30).until(lambda b: "parameters" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "top1").text != "")
        assert browser.find_element(By.ID, "top1").text == want
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 3
        WebDriverWait(browser, 60).until(lambda b: (b.find_element(By.ID, "overlay").get_attribute("src") or "")
                                         .startswith("data:image/png"))
        shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"), dtype=np.float32)
        assert shot.std() > 10  # not blank: header, bars and images drawn
    finally:
        browser.quit()
