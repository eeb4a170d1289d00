"""What a running service needs around the recommender: settings, API types, the request
guard, joined scoring calls, the ranker pool, variants and routing, per-request
orchestration, which versions to serve, drift counting in workers, and the BentoML
workarounds (all of them in `bentoml_patches`, one marked module).

May import `models.core`, `models.lifecycle`, bentoml, aiohttp and pydantic; never
`training` or `service`.
"""
