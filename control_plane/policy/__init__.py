"""What is allowed: patterns, guards, rate limits, rules and policies, and their YAML form.

Pure: no I/O beyond reading a policy file, no bus, no recorder. See ``docs/control-plane.md``.
"""
