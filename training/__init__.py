"""Training pipeline for the recommender: `python -m training --help`."""
