"""vzd: the daemon's composition root (main), its routes, services and state."""
