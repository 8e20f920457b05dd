"""One module per CLI command (auto-registered by lorahub.cli)."""
