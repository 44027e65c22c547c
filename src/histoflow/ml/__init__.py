"""Deep learning layer (imports torch)."""
