"""Layer 7 (beside engine.run): load_recipe, --set and extends, validation problems, the JSON schema, reference docs, the starter."""
