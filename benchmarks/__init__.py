"""Measured comparisons (not tests): each module's `main` prints one table."""
