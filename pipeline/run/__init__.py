"""A labeling run: options, preparation, progress, budget, estimate, summary, several processes."""
