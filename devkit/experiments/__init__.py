"""Controlled experiments: ``shapes`` (λ = 0 vs λ > 0 on generated shape scenes, data from
``shapes_scenes``)."""
