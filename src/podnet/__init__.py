"""podnet: container networking for large Kubernetes clusters."""

__version__ = "0.1.0"
