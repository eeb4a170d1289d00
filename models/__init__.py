"""The recommender and its serving, in three layers; arrows point down only:

    models.serving   -> models.lifecycle -> models.core

`core` is the recommender itself (numpy, pandas/pyarrow, xgboost only), `lifecycle` the
versions in the model store and their stages, `serving` everything a running BentoML
service needs. Nothing here imports `training` or `service`. The contracts are in
pyproject.toml ([tool.importlinter]) and checked by tests/unit/test_layers.py.
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml says the same; a test checks)
