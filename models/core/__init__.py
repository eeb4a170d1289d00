"""The recommender itself, the part a researcher reads: the feature schema, the interaction
log, the serving tables, candidates, features, ranking, metrics, model parameters, the
`Recommender`, and the drift statistics (reference profile, binning, PSI/KS).

May import numpy, pandas, pyarrow and xgboost only: never bentoml, aiohttp, pydantic or
pydantic-settings, nor `models.lifecycle`, `models.serving`, `training` or `service`.
"""
