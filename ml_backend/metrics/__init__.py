"""Evaluation metrics over numpy arrays (pure: no Django)."""
