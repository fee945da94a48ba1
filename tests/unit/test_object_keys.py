"""One parser of object keys, /podnet/objects/<Kind>/[<namespace>/]<name>, for every reader."""

from __future__ import annotations

import pytest

from podnet.agent.cache import kind_of_key
from podnet.dns.index import ClusterIndex
from podnet.model.objects import Namespace, Service
from podnet.store.objects import ObjectEvent, key_of, object_key, split_object_key


@pytest.mark.parametrize("key, want", [
    ("/podnet/objects/Service/prod/web", ("Service", "prod", "web")),
    ("/podnet/objects/Node/n1", ("Node", None, "n1")),
    ("/podnet/objects/Frobnicator/default/x", ("Frobnicator", "default", "x")),
    ("/podnet/objects/Service", None),
    ("/podnet/objects/Pod/a/b/c", None),
    ("/podnet/ipam/blocks/10.0.0.0-26", None),
    ("", None),
])
def test_split_object_key(key, want):
    assert split_object_key(key) == want
    assert kind_of_key(key) == (want[0] if want else None)


def test_round_trips_with_object_key():
    assert split_object_key(object_key(Service, "web", "prod")) == ("Service", "prod", "web")
    assert split_object_key(object_key(Namespace, "prod")) == ("Namespace", None, "prod")
    s = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    assert split_object_key(key_of(s)) == ("Service", "default", "web")


def test_dns_index_forgets_an_object_deleted_by_key_alone():
    i = ClusterIndex()
    s = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
                                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    i.apply_event(ObjectEvent("ADDED", s, key_of(s), 2))
    assert ("Service", "prod", "web") in i.keys()
    i.apply_event(ObjectEvent("DELETED", None, "/podnet/objects/Service/prod/other", 3))
    assert ("Service", "prod", "web") in i.keys()
    i.apply_event(ObjectEvent("DELETED", None, key_of(s), 4))
    assert ("Service", "prod", "web") not in i.keys()
