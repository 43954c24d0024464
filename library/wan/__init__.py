"""The WAN model family: DiT, VAEs, umT5 text encoder, checkpoint loading and attention backends."""
