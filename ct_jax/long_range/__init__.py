"""Long-range benchmark: synthetic recall at chosen distances, natural text, variants and reports."""
