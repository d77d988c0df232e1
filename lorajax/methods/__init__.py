"""Adapter providers: how an adapted kernel computes ``x ⊗ W``."""
