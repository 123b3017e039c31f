"""Built-in balancers (one plugin per module)."""
