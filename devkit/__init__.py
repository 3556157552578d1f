"""Look&Learn developer kit: tools for developing and testing the engine, never used by a production build.

- ``devkit.fake_judge_server``: a local OpenAI-compatible Chat Completions server that answers like a
  judge (``python -m devkit.fake_judge_server``), for tests and the judge benchmark.
- ``devkit.tiny_models``: tiny randomly initialised GroundingDINO and SAM folders
  (``lookandlearn tiny-models DIR``) for tests and the offline sample build.
- ``devkit.tiny_vlms``: tiny random-weight VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL) for tests, ``make train``
  (``model.tiny_if_missing``) and the experiments.
- ``devkit.sample_data``: the bundled offline sample inputs (``lookandlearn sample-data DIR``).
- ``devkit.experiments``: controlled experiments (``lookandlearn experiment shapes``) and their
  generated data.

devkit may import ``stages`` and ``pipeline``; ``stages`` never imports devkit, and ``pipeline`` only
lazily, inside the CLI handlers of the developer commands.
"""
