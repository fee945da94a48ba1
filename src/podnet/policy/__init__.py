"""NetworkPolicy (networking.k8s.io/v1) in nftables: a pure compiler from objects
to a desired table, an incremental atomic applier, and an explainer that walks
the compiled table."""
