"""Evaluations beyond the validation loss: passkey retrieval."""
