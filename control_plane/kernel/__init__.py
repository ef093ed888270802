"""KernelSpace and the parts it is composed of: the gate, the process table, signals, admission.

See ``docs/control-plane.md``.
"""
