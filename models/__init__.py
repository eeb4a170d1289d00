"""The recommender: feature schema, tables, candidates, features, ranking, metrics, store."""
