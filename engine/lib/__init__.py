"""Layer 5: what stages are made of: prompts, scoring and scorers, rewards, pairs, constitutions, revisions, training, eval suites."""
