"""Engines: other ways for requests to travel. The online engine is the run itself (`pipeline.run.lifecycle`);
`batch/` sends rows through the OpenAI Batch API; `ray/` runs the labeling as a Ray Data job. Every engine
shares `prepare_run`, `RowGate`, `request.py` and the sink, so resume, dead letters and the resume guard
work the same whichever one labeled a row."""
