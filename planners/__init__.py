"""Shipped planners: one small file each, meant to be read and copied (docs/planner.md).

Run one with `microserve launch ... --planner planners/queue.py` (or just `--planner queue`).
"""
