"""The bus side of the control plane: attaching a client, and the mediator applied to its messages.

The mediator's per-message decision, its hold queues, the mediated-mode checks, who a message
is from, and the requests waiting for their reply. See ``docs/control-plane.md``.
"""
