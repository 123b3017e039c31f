"""Built-in rewards (one plugin per module)."""
