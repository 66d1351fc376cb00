"""Layer 3: models: builtins, weights, model info, chat masks, the model pool, and generation backends (one registry)."""
