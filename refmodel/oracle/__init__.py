"""Oracles: independent executable implementations the reference model is checked against."""
