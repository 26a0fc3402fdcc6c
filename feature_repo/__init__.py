"""Feast definitions of Engage's customer features (embedded profile: DuckDB offline, SQLite online)."""
