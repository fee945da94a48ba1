"""The object model: Kubernetes-shaped kinds, label selectors and manifest loading."""
