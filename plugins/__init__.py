"""Built-in marble-kit plugins, written exactly like third-party ones (see docs/plugins.md)."""
