"""Model versions in the BentoML store: saving them atomically, their integrity checks
(file digests, schema hash), and the registry of stages (champion, challenger).

May import `models.core`, bentoml and the standard library; never `models.serving`,
`training` or `service`.
"""
