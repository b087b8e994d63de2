"""The HTTP API and web page: one model loaded once, requests micro-batched, every bad upload a 4xx naming
what was wrong (never a 500)."""
import asyncio
import base64
import time
from pathlib import Path

import torch

from ..errors import require

# No `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at definition.
STATIC = Path(__file__).parent / "static"
RAW_TYPES = ("image/", "application/octet-stream")
MAX_BATCH_IMAGES = 64


class Model:
    """A run's model ready to serve: preprocessing from its metadata, an int8 copy where asked, a batcher.

    Args:
        checkpoint: run folder or seqvision weights file.
        int8: answer /predict with the int8 model (saliency still uses the float weights).
        threads: torch threads (0: torch's default).
        max_batch: most requests per forward pass.
        max_wait_ms: longest a request waits for others to share its pass.
        topk: classes per answer.
    """

    def __init__(self, checkpoint: str, int8: bool = False, threads: int = 0, max_batch: int = 16,
                 max_wait_ms: float = 5.0, topk: int = 5):
        from ..checkpoint import eval_transform, load_for_inference
        from ..flops import count_params
        from .batcher import MicroBatcher

        if threads:
            torch.set_num_threads(threads)
        self.float_model, self.classes, data, meta = load_for_inference(checkpoint)
        self.model = self.float_model
        self.int8 = meta.get("int8") == "1"
        if int8 and not self.int8:
            from ..quantize import quantize_int8
            self.model, self.int8 = quantize_int8(self.float_model), True
        self.transform, self.size = eval_transform(self.float_model, data)
        self.name = meta.get("name") or type(self.model).__name__
        self.params = count_params(self.float_model)
        self.topk = min(topk, len(self.classes))
        self.batcher = MicroBatcher(lambda x: self.model(x).softmax(-1), max_batch, max_wait_ms)

    def info(self) -> dict:
        cfg = self.float_model.cfg
        return {"name": self.name, "classes": self.classes, "input_size": [cfg.in_chans, self.size, self.size],
                "in_chans": cfg.in_chans, "params": self.params, "int8": self.int8,
                "max_batch": self.batcher.max_batch}

    def top(self, probs: torch.Tensor) -> list[dict]:
        values, indices = probs.topk(self.topk)
        return [{"label": self.classes[i], "prob": round(p, 6)} for p, i in zip(values.tolist(), indices.tolist())]


def create_app(model: Model, max_bytes: int = 8 << 20):
    """The FastAPI app serving `model`; bodies above `max_bytes` are refused with 413 before being read whole."""
    fastapi = require("fastapi", "serve")
    from fastapi import HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from ..data import DataError, open_image

    app = fastapi.FastAPI(title="seqvision", description=f"{model.name}: image classification")
    app.state.model = model
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(Exception)
    async def unexpected(request, e):  # a bug, not the client's fault; still one line, no traceback page
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    async def body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"body of {int(declared):,} bytes is over the limit of {max_bytes:,}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_bytes:
                raise HTTPException(413, f"body is over the limit of {max_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each image in the request: a raw image body, or the files of a multipart form."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        data = await body(request)
        if kind.startswith(RAW_TYPES):
            return [("body", data)]
        if kind != "multipart/form-data":
            raise HTTPException(415, f"content type {kind or '(none)'!r} is not an image: send multipart/form-data "
                                     f"with a file, or the image bytes as image/* or application/octet-stream")

        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}
        try:
            form = await Request(request.scope, replay).form(max_files=MAX_BATCH_IMAGES, max_fields=16)
        except Exception as e:  # malformed multipart: boundaries, headers, too many parts
            raise HTTPException(400, f"malformed multipart body ({getattr(e, 'detail', e)})") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise HTTPException(400, "the form holds no file: send the image as a file field, e.g. -F file=@x.png")
        return files

    def decode(name: str, data: bytes):
        """(image, model input) of an upload; runs in a worker thread so decoding never blocks the event loop."""
        try:
            image = open_image(data)
            return image, model.transform(image)
        except DataError as e:
            raise HTTPException(400, str(e).replace("image bytes", f"upload {name!r}", 1)) from None

    async def classify(x: torch.Tensor) -> torch.Tensor:
        return await asyncio.wrap_future(model.batcher.submit(x))

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/model")
    def info():
        return model.info()

    @app.post("/predict")
    async def predict(request: Request):
        """One image (multipart file field, or the raw bytes): the top-k classes with probabilities."""
        t0 = time.perf_counter()
        files = await uploads(request)
        if len(files) != 1:
            raise HTTPException(400, f"/predict takes one image, got {len(files)}; use /predict/batch")
        probs = await classify((await asyncio.to_thread(decode, *files[0]))[1])
        return {"model": model.name, "top": model.top(probs), "latency_ms": round(1e3 * (time.perf_counter() - t0), 2)}

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        """Several images as files of one multipart form: one answer per file, in order."""
        t0 = time.perf_counter()
        files = await uploads(request)
        xs = [x for _, x in await asyncio.gather(*(asyncio.to_thread(decode, n, d) for n, d in files))]
        probs = await asyncio.gather(*(classify(x) for x in xs))
        return {"model": model.name, "results": [{"file": n, "top": model.top(p)} for (n, _), p in zip(files, probs)],
                "latency_ms": round(1e3 * (time.perf_counter() - t0), 2)}

    @app.post("/explain")
    async def explain(request: Request):
        """The top class's input-gradient saliency over the image, as a PNG data URL."""
        from .saliency import overlay, saliency

        files = await uploads(request)
        image, x = await asyncio.to_thread(decode, *files[0])
        if getattr(model.float_model, "int8", False):
            raise HTTPException(400, "this checkpoint holds int8 weights only; saliency needs the float model")

        def work():
            with torch.no_grad():
                probs = model.float_model(x[None]).softmax(-1)[0]
            top = int(probs.argmax())
            return top, float(probs[top]), overlay(image, saliency(model.float_model, x, top))
        top, prob, png = await asyncio.to_thread(work)
        return {"label": model.classes[top], "prob": round(prob, 6),
                "overlay": "data:image/png;base64," + base64.b64encode(png).decode()}

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, int8: bool = False, threads: int = 0,
          max_batch: int = 16, max_wait_ms: float = 5.0, max_mb: float = 8.0) -> None:
    """Load `checkpoint` and serve it with uvicorn until interrupted."""
    uvicorn = require("uvicorn", "serve")
    model = Model(checkpoint, int8=int8, threads=threads, max_batch=max_batch, max_wait_ms=max_wait_ms)
    print(f"serving {model.name} ({'int8' if model.int8 else 'fp32'}, {len(model.classes)} classes) on "
          f"http://{host}:{port}/")
    uvicorn.run(create_app(model, int(max_mb * (1 << 20))), host=host, port=port, log_level="warning")
