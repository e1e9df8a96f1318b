"""The op layer: custom ops and keyword wrappers per kernel family, between the public functions and
the backend launchers (docs/architecture.md)."""
