"""The record step: run directory, metrics, checkpoints and the HTML report."""
