"""The floor a labeler cannot go below: the SDK call alone, same request as labelstream sends, nothing else.

    python scripts/sdk_floor.py --base-url URL --requests 5000 --concurrency 100 [--mode typed|post]

typed: client.chat.completions.with_raw_response.create(...) (aiohttp transport, raw response, orjson);
post:  client.post("/chat/completions", content=orjson bytes), the SDK's low-level call labelstream uses.
Prints JSON with the CPU time per request, to compare with a full labelstream run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.task.config import load_config
from pipeline.task.prompt import Prompt

ROOT = Path(__file__).resolve().parent.parent


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--mode", choices=["typed", "post"], default="typed")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "sentiment.toml")
    prompt = Prompt(config)
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key="sk-floor", max_retries=0, http_client=openai.DefaultAioHttpClient()
    )
    remaining = args.requests

    async def call(i: int) -> None:
        messages: Any = prompt.messages(f"리뷰 {i}: 배송이 빨라요. Great value!")
        if args.mode == "typed":
            raw = await client.chat.completions.with_raw_response.create(
                model=config.model,
                messages=messages,
                response_format=prompt.response_format,  # type: ignore[arg-type]
                temperature=config.temperature,
                max_completion_tokens=config.max_tokens,
            )
            orjson.loads(await raw.http_response.aread())
            return
        body = {
            "model": config.model,
            "messages": messages,
            "response_format": prompt.response_format,
            "temperature": config.temperature,
            "max_completion_tokens": config.max_tokens,
        }
        response = await client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=orjson.dumps(body),
            options={"headers": {"Content-Type": "application/json"}},
        )
        orjson.loads(await response.aread())

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(remaining)

    wall, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for _ in range(args.concurrency):
            group.create_task(worker())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.close()
    print(json.dumps({"requests": args.requests, "elapsed_s": wall, "cpu_ms_per_request": 1000 * cpu / args.requests}))


if __name__ == "__main__":
    asyncio.run(main())
