"""Trace-driven simulator of the Conductor (see scheduler/sim/engine.py)."""
