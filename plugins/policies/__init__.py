"""Built-in policies (one plugin per module)."""
