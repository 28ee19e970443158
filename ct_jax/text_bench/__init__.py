"""The text benchmark: Compressive Transformer against Transformer-XL of equal cost on long documents."""
