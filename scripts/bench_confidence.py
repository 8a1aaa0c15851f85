"""The CPU cost of reading a label's confidence from a reply's logprobs, per reply shape (OpenAI, vLLM with its
stop token, vLLM with whitespace padding), next to the SDK's own cost per request (the floor, ~1.7-3 ms).

    .venv/bin/python scripts/bench_confidence.py [--replies 20000]

The replies come from the simulator on 127.0.0.1 (one request per shape); the timing is of `label_confidence` alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.api.confidence import label_confidence  # noqa: E402
from pipeline.simulator import SimulatorConfig, SimulatorThread  # noqa: E402
from pipeline.task.config import load_config  # noqa: E402 - after the path is set
from pipeline.task.prompt import Prompt  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "openai": {},
    "vllm (</s> last)": {"server": "vllm"},
    "vllm + padding": {"server": "vllm", "pad_whitespace": 4},
}


def reply(prompt: Prompt, **settings: Any) -> tuple[str, list[dict[str, Any]]]:
    """The content and logprobs of one simulated reply in a given shape."""
    with SimulatorThread(SimulatorConfig(latency_ms=0, **settings)) as sim:
        body = {"model": "gpt-4o-mini", "messages": prompt.messages("great product, love it"),
                "response_format": prompt.response_format, "logprobs": True, "top_logprobs": 3}  # fmt: skip
        request = urllib.request.Request(  # noqa: S310 - loopback only
            sim.base_url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback only
            choice = json.loads(answer.read())["choices"][0]
    return choice["message"]["content"], choice["logprobs"]["content"]


def main() -> None:
    """Print µs per reply and the confidence read, per shape."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replies", type=int, default=20_000)
    args = parser.parse_args()
    prompt = Prompt(load_config(ROOT / "configs" / "sentiment.toml"))
    for name, settings in SHAPES.items():
        content, tokens = reply(prompt, **settings)
        label = json.loads(content)["label"]

        def read(content: str = content, tokens: Any = tokens, label: str = label) -> float | None:
            return label_confidence(content, tokens, label, "label", prompt.config.labels)

        best = min(timeit.repeat(read, number=args.replies, repeat=5)) / args.replies
        print(f"{name:18s} {best * 1e6:6.1f} µs/reply  confidence={read()}  ({best / 1.7e-3:.2%} of 1.7 ms)")


if __name__ == "__main__":
    main()
