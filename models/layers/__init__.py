"""Reusable layers: heads, the fusion op."""
