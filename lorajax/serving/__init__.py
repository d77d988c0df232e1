"""Serving many adapters over one frozen base."""
