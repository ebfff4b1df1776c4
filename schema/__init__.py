"""The schema migrations, shipped as package data and applied by `ingest migrate`."""
