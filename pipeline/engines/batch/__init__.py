"""The batch engine: rows through the OpenAI Batch API at half price, with the online run's guarantees.

    files.py     request files (the online request body, split at 50,000 requests / 200 MB / one model) and
                 the rows file kept beside each
    ledger.py    what was sent, in OUT.meta/batches.json: prepared → uploaded → creating → submitted → collected
    api.py       the Files and Batch API calls through the unmodified AsyncOpenAI client, with retries
    submit.py    planning request files from the input, and upload → record → create → record
    poll.py      waiting for batches with backoff, and the progress they show
    ingest.py    result lines (OpenAI's or vLLM run_batch's) → validated replies → sink and dead letters
    engine.py    `label --engine batch`: the run that ties them together
    auto.py      `label --engine auto`: a first slice online, the rest as batches
    offline.py   `batch prepare` and `batch ingest`: request files for other runners, their results merged
    manage.py    `batch status` and `batch cancel`

Modules load the SDK; `ledger.py`, `files.py` and `settings.py` do not.
"""
