"""Documented experiments of the OAP project (run as commands, not in CI)."""
