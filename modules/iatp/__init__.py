"""Inter-Agent Trust Protocol: ed25519 identities, signed envelopes, replay protection and trust."""
