"""Shipped routing strategies: one small file each, meant to be read and copied.

Run one with `microserve launch --strategy strategies/pd.py` (or just `--strategy pd`).
"""
