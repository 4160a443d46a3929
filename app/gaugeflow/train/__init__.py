"""Training of flow models: losses and a minimal loop."""
