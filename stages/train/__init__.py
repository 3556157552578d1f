"""Training-side stages (data, attention capture, loss): see DESIGN.md."""
