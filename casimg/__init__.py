"""casimg: a content-addressed image download service."""

__version__ = "0.1.0"
