"""The WAN trainer's library: models (`wan`), data, config and training. Nothing runs at import time."""
