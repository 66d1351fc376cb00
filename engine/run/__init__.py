"""Layer 7 (beside engine.load): the plan, the Context, the executor (local and Ray), accelerate launches."""
