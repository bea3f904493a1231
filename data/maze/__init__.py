"""TFDS builder for generated maze episodes (see maze_dataset_builder.py)."""
