"""HTTP service, offline demo page and side-by-side review panel.

``twotower.serve.app`` needs FastAPI (the ``serve`` extra); ``twotower.serve.reviews`` needs only
the standard library and numpy, so ``twotower review-report`` runs without it.
"""
