"""The daemon's services: one per resource, each a typed method per user-visible operation."""
