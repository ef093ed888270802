"""Episodic Memory Kernel: append-only memory with semantic search."""
