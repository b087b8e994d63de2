"""`seqvision serve-bench`: a bounded load test of a running server on loopback: req/s, p50, p99, errors."""
from __future__ import annotations

import io
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def sample_png(url: str) -> bytes:
    """A noise image of the served model's input size, as PNG."""
    import numpy as np
    from PIL import Image

    with urllib.request.urlopen(f"{url}/model", timeout=30) as r:
        c, h, w = json.load(r)["input_size"]
    pixels = np.random.default_rng(0).integers(0, 256, (h, w) if c == 1 else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def run(url: str, requests: int = 500, concurrency: int = 8, image: bytes | None = None) -> dict:
    """Send `requests` POST /predict with `concurrency` in flight; latencies are per request, client side.

    Args:
        url: the server's base URL, e.g. http://127.0.0.1:8000.
        requests: how many requests in all.
        concurrency: how many at once.
        image: the body to send (default: a noise image of the model's input size).
    """
    url = url.rstrip("/")
    data = image or sample_png(url)

    def one(_) -> tuple[float, bool]:
        req = urllib.request.Request(f"{url}/predict", data=data, headers={"Content-Type": "image/png"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                ok = r.status == 200 and bool(json.load(r)["top"])
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            ok = False
        return time.perf_counter() - t0, ok

    one(0)  # warm-up: the first request pays for lazy initialisation
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    ms = sorted(1e3 * t for t, _ in results)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"requests": requests, "concurrency": concurrency, "req_per_s": round(requests / wall, 1),
            "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "errors": sum(not ok for _, ok in results)}
