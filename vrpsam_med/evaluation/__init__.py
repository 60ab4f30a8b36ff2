"""Protocols, metrics, baselines and reports."""
