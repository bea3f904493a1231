"""TFDS builder for generated wordle episodes (see wordle_dataset_builder.py)."""
