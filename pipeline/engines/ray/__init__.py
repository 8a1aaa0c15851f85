"""The Ray engine: labelstream's client as a Ray Data stage (`labeler`), one rate limit for all actors
(`limit`), Ray's Parquet writer aimed at a labelstream sink (`output`), and `label --engine ray` (`engine`).
The public entry points are in `pipeline.ray`."""
