"""imgclf: from a list of labelled image URLs to an evaluated, deployable image classifier."""

__version__ = "0.1.0"
