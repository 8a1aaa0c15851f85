"""The design labelstream replaces, kept for benchmarks: one task per row, gather + semaphore, all in memory.

This mirrors the old one-script labeler (read the whole CSV, create a task per row, limit with a
semaphore, keep results in a list, write them at the end, no backoff). Benchmarks run it against
the same simulator, in the same session, as the baseline for every figure they report.

    python scripts/seed_baseline.py IN.csv OUT.json --base-url URL --max_concurrent 100
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time

import openai


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input_csv")
    parser.add_argument("output")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max_concurrent", type=int, default=10)
    parser.add_argument("--sdk-retries", type=int, default=0, help="the seed had no backoff of its own")
    args = parser.parse_args()

    with open(args.input_csv, newline="", encoding="utf-8-sig") as handle:  # noqa: PTH123, ASYNC230 - as the seed did
        rows = list(csv.DictReader(handle))
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="sk-seed", max_retries=args.sdk_retries)
    semaphore = asyncio.Semaphore(args.max_concurrent)
    labels = ["positive", "negative", "neutral"]
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "label",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": labels}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }

    async def label_one(row: dict[str, str]) -> dict[str, object]:
        async with semaphore:
            try:
                reply = await client.chat.completions.create(
                    model=args.model,
                    messages=[
                        {"role": "system", "content": "Label the sentiment: positive, negative or neutral."},
                        {"role": "user", "content": row["text"]},
                    ],
                    response_format=schema,  # type: ignore[arg-type]
                    temperature=0,
                )
                return {"id": row["id"], "label": json.loads(reply.choices[0].message.content or "{}").get("label")}
            except openai.APIError as exc:  # the seed logged and dropped the row
                return {"id": row["id"], "error": type(exc).__name__}

    started = time.perf_counter()
    results = await asyncio.gather(*(label_one(row) for row in rows))
    with open(args.output, "w", encoding="utf-8") as handle:  # noqa: PTH123, ASYNC230
        json.dump(results, handle)
    await client.close()
    ok = sum(1 for r in results if "label" in r)
    print(
        json.dumps({"rows": len(rows), "ok": ok, "failed": len(rows) - ok, "elapsed_s": time.perf_counter() - started})
    )


if __name__ == "__main__":
    asyncio.run(main())
