"""Scheduled jobs: nightly dataset rebuild, LoRA training, evaluation and promotion."""
