"""`seqvision serve`: a trained model behind an HTTP API and a web page.

`app.create_app` loads a run once (preprocessing from its metadata), micro-batches concurrent requests
(`batcher.MicroBatcher`), and explains a prediction with an input-gradient saliency overlay
(`saliency.overlay`). `bench.run` is the load test behind `seqvision serve-bench`.
"""
