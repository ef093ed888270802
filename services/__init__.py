"""Runnable services that answer requests over the bus."""
