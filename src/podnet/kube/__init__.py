"""The Kubernetes API as podnet's source: a client (client.py), a reflector of its own
(reflector.py), the dataplane fields kept of each kind (project.py), Lease election (leader.py)
and the `podnet kube-sync` controller that writes the API's objects into podnet's store
(sync.py)."""
