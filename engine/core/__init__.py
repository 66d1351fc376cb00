"""Layer 0, needs nothing else of the engine: errors, atomic writes, hashing, seeds, threads, console routing, text rules and statistics, plots, report documents, TOML."""
