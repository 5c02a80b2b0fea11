"""POST /v1/explain latency on the GPT-2-small shape (random weights, 50,257 tokens), 32-token
texts, in-process (FastAPI's TestClient): the explorer's request (one layer's details, every
layer's logit lens, top 10) and the whole walkthrough, against one plain forward pass of the same
model measured in the same run.

  python benchmarks/explain_latency.py            needs transformers (to save the directory)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from serve_throughput import corpus, gpt2_directory

from qkv.server import create_app, load_served


def timed(work, repeats: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    text = corpus()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = gpt2_directory(Path(folder) / "gpt2", text, 12)
        served = load_served(model_dir, "cpu")
        ids = served.tokenizer.encode(" ".join(text.split()[:40]))[:32]
        with torch.no_grad():
            forward, _ = timed(lambda: served.model(torch.tensor([ids])))
        with TestClient(create_app(served)) as client:
            rows = []
            for label, body in [
                ("explorer request (layer 0, top 10)", {"token_ids": ids, "layers": [0]}),
                ("explorer request, one head", {"token_ids": ids, "layers": [5], "heads": [3]}),
                ("whole walkthrough (every layer, top 10)", {"token_ids": ids}),
            ]:
                seconds, reply = timed(lambda body=body: client.post("/v1/explain", json=body))
                assert reply.status_code == 200, reply.text
                rows.append((label, seconds, len(reply.content)))
    print(f"GPT-2 small shape (124M, random weights), {len(ids)} tokens; "
          f"one forward pass {forward * 1e3:.0f} ms")  # fmt: skip
    print(f"{'request':42} {'median':>9} {'vs forward':>11} {'payload':>10}")
    for label, seconds, size in rows:
        print(f"{label:42} {seconds * 1e3:7.0f} ms {seconds / forward:10.1f}x "
              f"{size / 1e6:7.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
