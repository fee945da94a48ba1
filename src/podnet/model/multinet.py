"""The spec of NetworkAttachmentDefinition (k8s.cni.cncf.io/v1, the kind is in objects.py):
an additional network a pod can ask for by name (podnet.multinet).

    apiVersion: k8s.cni.cncf.io/v1
    kind: NetworkAttachmentDefinition
    metadata: {name: underlay, namespace: default}
    spec:
      config: |
        {"cniVersion": "1.0.0", "type": "macvlan", "master": "data0", "mode": "bridge",
         "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": "10.99.0.0/24"}}

spec.config is the CNI configuration as JSON text, one plugin (type) or a list (plugins),
checked when the object is read (podnet.multinet.netconf): an error names the object and
spec.config, and where inside the configuration it is wrong. Unlike Multus, podnet needs
spec.config (no configuration files are looked up on the node by the network's name).
"""

from __future__ import annotations

from pydantic import field_validator

from podnet.model.base import Schema


class NetworkAttachmentDefinitionSpec(Schema):
    config: str

    @field_validator("config", mode="before")
    @classmethod
    def _config(cls, v: object) -> object:
        from podnet.multinet.netconf import NetConf, NetConfError

        try:
            NetConf.parse(v)
        except NetConfError as e:
            raise ValueError(f"{e.path}: {e.message}" if e.path else e.message) from None
        return v
