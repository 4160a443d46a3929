"""Markov chain samplers and their statistics."""
