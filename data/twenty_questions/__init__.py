"""TFDS builder for generated Twenty Questions episodes (see twenty_questions_dataset_builder.py)."""
