"""The application built on the engine: command line, experiments, data sets, models, runs,
checkpoints, distributed helpers and benchmarks.

The engine (``bilevel``) never imports this package; the application uses the engine's public
API as users do.
"""
