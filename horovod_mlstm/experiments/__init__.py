"""Experiments built on the training CLI."""
