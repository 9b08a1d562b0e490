"""Shared data helpers and the embedded datasets used by more than one method."""
