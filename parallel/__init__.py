"""Distributed runtime: process groups, stage layout, block-summary payload, cache, schedules.

The model code never imports from here; this package knows stages and payloads, not KDA or MoE.
"""
