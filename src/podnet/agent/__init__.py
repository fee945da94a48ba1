"""The node agent: watches the store and owns its node's dataplane."""
