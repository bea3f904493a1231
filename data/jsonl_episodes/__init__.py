"""TFDS builder for a user's JSONL episode files (see jsonl_episodes_dataset_builder.py)."""
