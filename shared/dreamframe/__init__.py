"""DreamFrame's common library: the API stubs (v1), storage, config, serving, the story model."""

__version__ = "0.1.0"
