"""Layer 1: rows (Parquet in and out) and datasets (every file format to normalized rows, with drop reasons)."""
