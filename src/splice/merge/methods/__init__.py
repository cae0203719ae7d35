"""Merge methods, one file each; see registry.py for the contract."""
