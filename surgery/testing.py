"""pytest plugin of token-surgery (placeholder replaced by the conformance kit)."""
