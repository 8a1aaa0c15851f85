"""Rate control: the limiter, its pacing, the headers it reads, the share of a key among siblings."""
