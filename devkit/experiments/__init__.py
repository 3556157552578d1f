"""Controlled experiments: ``shapes`` (the where-to-look instrument: λ = 0 vs λ > 0 on generated
shape scenes; ``shapes_tasks`` the scenes, captions and questions, ``shapes_eval`` the held-out
measurements, ``shapes_report`` the rows and tables; ``shapes_scenes`` the two-shape records
the training tests use)."""
