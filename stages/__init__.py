"""Built-in stage kinds, one module each. See engine/registry.py for the kind -> module table."""
