"""labelstream: label large CSV files with an OpenAI-compatible chat model."""
