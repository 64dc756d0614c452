"""The guest side: the in-guest agent (C source) and its wire protocol."""
