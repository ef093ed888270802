"""Cross-Model Verification Kernel: several LLMs check an answer, by meaning."""
