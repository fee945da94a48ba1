"""Several networks per pod, in Multus's formats, run inside the node agent.

A pod keeps podnet's eth0 (the cluster network: pods, Services, DNS, policy) and may ask
for more interfaces with the annotation `k8s.v1.cni.cncf.io/networks`, naming
NetworkAttachmentDefinitions (k8s.cni.cncf.io/v1) whose spec.config is a CNI
configuration. After eth0, the agent's CNI handler runs each network's plugins (the
reference plugins: macvlan, bridge, vlan, host-device with host-local, static or
podnet-ipam) exactly as a CNI runtime would, all or nothing, and writes the
`k8s.v1.cni.cncf.io/network-status` annotation back to the Pod.

    netconf.py      a NetworkAttachmentDefinition's CNI configuration: parsed and checked
    selection.py    the networks annotation, both forms, and the pod's interface names
    plan.py         which networks a pod gets: its annotation, the NADs, namespace isolation
    invoke.py       running one CNI plugin executable (CNI_* environment, result or error)
    podipam.py      podnet-ipam: addresses for delegates from podnet's compare-and-swap IPAM
    delegate.py     one network's plugin list: ADD, DEL and CHECK as libcni runs them
    results.py      CNI results of any version in one shape; the pod's merged result
    routes.py       default-route: the pod's default route moved to a chosen network
    status.py       the network-status annotation: built from results, written to the Pod
    attachments.py  a pod's networks together: ADD all or nothing, DEL in reverse, CHECK, GC
"""

ANNOTATION_NETWORKS = "k8s.v1.cni.cncf.io/networks"
ANNOTATION_STATUS = "k8s.v1.cni.cncf.io/network-status"
PODNET_IPAM = "podnet-ipam"
