"""TFDS builder for generated chess episodes (see chess_dataset_builder.py)."""
