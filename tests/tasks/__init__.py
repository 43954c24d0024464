"""End-to-end tests of the extra WAN tasks (FLF2V, one-frame, text-to-image, LyCORIS files) on tiny models."""
