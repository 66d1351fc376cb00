"""Layer 8: the run report and what `recipe status` and `show` print."""
