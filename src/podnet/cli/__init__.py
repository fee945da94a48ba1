"""The `podnet` command line."""
