"""Layer 4: what is kept: fingerprints, the content-addressed cache, shards, run records, gc."""
