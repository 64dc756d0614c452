"""Wire models: the one typed model per resource that the CLI, the API and the SDK share.

This package itself imports nothing: `api.bounds` is pydantic-free (the CLI checks its
arguments with it before any request), the other modules hold the pydantic models.
"""
