"""Built-in stage kinds, one module each. See engine/spec/registry.py for the kind -> module table."""
