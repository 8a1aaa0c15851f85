"""The floor a labeler cannot go below: bare AsyncOpenAI calls (aiohttp transport, raw responses), nothing else.

    python scripts/sdk_floor.py --base-url URL --requests 5000 --concurrency 100
Prints JSON with the CPU time per request, to compare with a full labelstream run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai
import orjson

MESSAGES = [
    {"role": "system", "content": "Label the sentiment of the text: positive, negative or neutral."},
    {"role": "user", "content": "배송이 빠르고 포장도 꼼꼼했어요. Great value!"},
]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key="sk-floor", max_retries=0, http_client=openai.DefaultAioHttpClient()
    )
    remaining = args.requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=MESSAGES,  # type: ignore[arg-type]
                temperature=0,
                max_completion_tokens=20,
            )
            orjson.loads(await raw.http_response.aread())

    wall, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for _ in range(args.concurrency):
            group.create_task(worker())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.close()
    print(json.dumps({"requests": args.requests, "elapsed_s": wall, "cpu_ms_per_request": 1000 * cpu / args.requests}))


if __name__ == "__main__":
    asyncio.run(main())
