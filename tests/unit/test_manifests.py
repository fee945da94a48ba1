"""Manifest loading: errors name file, document, object and field; nothing partial."""

import pytest

from podnet.errors import ValidationError
from podnet.model.manifests import ManifestErrors, load_paths, parse_documents

GOOD = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, image: nginx, command: [x], ports: [{name: http, containerPort: 8080}]}]
"""


def test_multi_document_file_loads_and_skips_empty_documents(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(GOOD)
    objs = load_paths([f])
    assert [o.ref for o in objs] == ["Namespace/shop", "Pod/shop/a"]
    assert objs[1].named_port("http", "TCP") == 8080


def test_directory_loads_every_manifest_in_order(tmp_path):
    (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
    (tmp_path / "a.yml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [o.name for o in load_paths([tmp_path])] == ["a", "b"]


def test_error_names_file_document_object_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(GOOD + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
                 "spec: {ports: [{port: 99999}]}\n")
    with pytest.raises(ManifestErrors) as err:
        load_paths([f])
    (e,) = err.value.errors
    assert e.where == f"{f}: document 3 (Service/shop/web)"
    assert e.field == "spec.ports[0].port"
    assert "out of range" in str(e)


def test_all_errors_are_reported_not_just_the_first(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("kind: Widget\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: A}\n")
    with pytest.raises(ManifestErrors) as err:
        load_paths([f])
    msgs = [str(e) for e in err.value.errors]
    assert len(msgs) == 2
    assert "unknown kind 'Widget'" in msgs[0]
    assert "document 1" in msgs[1] and "metadata.name" in msgs[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("apiVersion: v1\nmetadata: {name: a}\n", "missing kind"),
        ("kind: Pod\nmetadata: {name: a}\n", "missing apiVersion"),
        ("apiVersion: v2\nkind: Pod\nmetadata: {name: a}\n", "apiVersion 'v2' is not served"),
        ("apiVersion: v1\nkind: Pod\n", "missing metadata"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, colour: red}\n", "unknown field"),
        ("apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {}\n", "required field is missing"),
    ],
)
def test_bad_documents(text, message):
    objs, errs = parse_documents(text, "x.yaml")
    assert not objs
    assert len(errs) == 1 and message in str(errs[0])
    assert str(errs[0]).startswith("x.yaml")


def test_yaml_syntax_error_points_at_line():
    _, errs = parse_documents("apiVersion: v1\nkind: [Pod\n", "x.yaml")
    assert str(errs[0]).startswith("x.yaml:")


def test_same_object_twice_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n"
                 "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    with pytest.raises(ManifestErrors, match="appears twice"):
        load_paths([f])


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValidationError, match="no such file"):
        load_paths([tmp_path / "nope.yaml"])


def test_list_kind_is_expanded():
    objs, errs = parse_documents(
        "kind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n"
    )
    assert not errs and [o.name for o in objs] == ["a", "b"]


def test_invalid_utf8_is_one_error_naming_the_file_and_place(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"apiVersion: v1\nkind: Namespace\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(ManifestErrors) as e:
        load_paths([f])
    assert str(e.value) == f"{f}:3:21: not valid UTF-8 (byte 0xe9): manifests must be UTF-8 text"


def test_invalid_utf8_through_the_cli_is_one_line(tmp_path, capsys, monkeypatch):
    from podnet.cli.main import main

    monkeypatch.setenv("PODNET_STORE", f"sqlite://{tmp_path}/podnet.db")
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"\xff\xfe garbage")
    assert main(["apply", "-f", str(f)]) == 1
    out, err = capsys.readouterr()
    assert err == f"error: {f}:1:1: not valid UTF-8 (byte 0xff): manifests must be UTF-8 text\n"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "bom.yaml"
    f.write_bytes("\ufeffapiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".encode())
    [ns] = load_paths([f])
    assert ns.name == "shop"


# ---------------------------------------------------------------- strict fields and size limits

SVC = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (SVC + "spec: {selecter: {app: web}, ports: [{port: 80}]}\n", "spec.selecter"),
        (SVC + "spec: {ports: [{port: 80, nodeport: 30080}]}\n", "spec.ports[0].nodeport"),
        (POD + "spec: {nodeNmae: n1, containers: [{name: c}]}\n", "spec.nodeNmae"),
        (POD + "spec: {containers: [{name: c, imag: nginx}]}\n", "spec.containers[0].imag"),
        (POD + "spec: {containers: [{name: c, ports: [{containerPort: 80, hostport: 8080}]}]}\n",
         "spec.containers[0].ports[0].hostport"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCidr: 10.0.0.0/24}\n", "spec.podCidr"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\nspec: {finalizer: [kubernetes]}\n", "spec.finalizer"),
    ],
)
def test_unknown_fields_are_refused_naming_them(text, field):
    objs, errs = parse_documents(text, "x.yaml")
    assert not objs and len(errs) == 1
    assert str(errs[0]).endswith(f"field {field}: unknown field"), str(errs[0])


def test_fields_upstream_defines_but_podnet_does_not_use_are_accepted():
    objs, errs = parse_documents(
        SVC + "spec: {ports: [{port: 80}], selector: {app: web}, ipFamilies: [IPv4], ipFamilyPolicy: SingleStack,"
              " loadBalancerIP: 192.0.2.1, trafficDistribution: PreferClose}\n---\n"
        + POD + "spec: {restartPolicy: Always, dnsPolicy: ClusterFirst, tolerations: [], containers: [{name: c,"
                " image: nginx, command: [sh], env: [{name: A, value: b}], resources: {}, imagePullPolicy: Always}]}\n"
        + "---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {providerID: x, taints: []}\n"
        + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n}\nspec: {finalizers: [kubernetes]}\n",
        "x.yaml")
    assert errs == [] and [o.kind for o in objs] == ["Service", "Pod", "Node", "Namespace"]
    assert objs[0].spec.selector == {"app": "web"}


def test_an_object_over_the_api_servers_size_limit_is_refused():
    big = "x" * (200 * 1024)
    pods = ", ".join(f"{{name: c{i}, image: {big}}}" for i in range(8))  # about 1.6 MiB
    objs, errs = parse_documents(POD + f"spec: {{containers: [{pods}]}}\n", "x.yaml")
    assert not objs and len(errs) == 1
    assert "x.yaml: document 0 (Pod/p): the object is" in str(errs[0])
    assert "the limit is 1572864 (1.5 MiB)" in str(errs[0])
    objs, errs = parse_documents(POD + f"spec: {{containers: [{pods.split('}, ')[0]}}}]}}\n", "x.yaml")
    assert errs == [] and len(objs) == 1


def test_annotations_over_256_kib_are_refused():
    def pod(note: str) -> str:
        return f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p, annotations: {{note: {note}}}}}\n"

    objs, errs = parse_documents(pod("a" * (256 * 1024)), "x.yaml")
    assert not objs and "field metadata.annotations: annotations take 262148 bytes" in str(errs[0])
    objs, errs = parse_documents(pod("a" * (256 * 1024 - 4)), "x.yaml")  # "note" and the value: the limit
    assert errs == [] and len(objs) == 1
