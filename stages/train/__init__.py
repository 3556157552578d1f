"""Training-side stages (data, attention capture, loss): see docs/architecture.md."""
