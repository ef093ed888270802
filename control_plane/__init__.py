"""Control plane: policy, signals and the flight recorder, applied to every message."""
