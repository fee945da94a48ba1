"""`podnet apply/get/delete` against the embedded store: atomic apply, one-line errors."""

import json

import pytest

from podnet.cli.main import main

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n"
SVC = ("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
       "spec: {ports: [{port: 80}], selector: {app: web}}\n")
POOL = "apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: main}\nspec: {cidr: 10.244.0.0/16}\n"


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite://{tmp_path}/podnet.db"
    monkeypatch.setenv("PODNET_STORE", url)
    return url


def write(tmp_path, name, *docs):
    f = tmp_path / name
    f.write_text("---\n".join(docs))
    return str(f)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_apply_get_roundtrip(store, tmp_path, capsys):
    f = write(tmp_path, "m.yaml", NS, SVC, POOL)
    code, out, _ = run(capsys, "apply", "-f", f)
    assert code == 0
    assert "Service/shop/web created" in out
    code, out, _ = run(capsys, "apply", "-f", f)
    assert "Service/shop/web unchanged" in out
    code, out, _ = run(capsys, "get", "svc", "-n", "shop", "-o", "json")
    items = json.loads(out)["items"]
    assert [i["metadata"]["name"] for i in items] == ["web"]
    assert int(items[0]["metadata"]["resourceVersion"]) > 0
    code, out, _ = run(capsys, "get", "services", "-A", "-l", "app=web")
    assert "web" in out and "shop" in out
    code, out, err = run(capsys, "get", "services", "-A", "-l", "app=db")
    assert "web" not in out and "No services found" in err


def test_bad_manifest_changes_nothing(store, tmp_path, capsys):
    good = write(tmp_path, "good.yaml", NS, POOL)
    bad = write(tmp_path, "bad.yaml", SVC.replace("port: 80", "port: 0"))
    code, _, err = run(capsys, "apply", "-f", good, "-f", bad)
    assert code == 1
    assert "bad.yaml: document 0 (Service/shop/web): field spec.ports[0].port" in err
    assert "Traceback" not in err
    code, out, err = run(capsys, "get", "ns")
    assert "shop" not in out


def test_missing_namespace_is_refused(store, tmp_path, capsys):
    code, _, err = run(capsys, "apply", "-f", write(tmp_path, "svc.yaml", SVC))
    assert code == 1 and "namespace 'shop' does not exist" in err


def test_pool_cidr_is_immutable(store, tmp_path, capsys):
    run(capsys, "apply", "-f", write(tmp_path, "p.yaml", POOL))
    code, _, err = run(capsys, "apply", "-f", write(tmp_path, "p2.yaml", POOL.replace("10.244.0.0/16", "10.245.0.0/16")))
    assert code == 1 and "spec.cidr: is immutable" in err


def test_delete_from_manifest(store, tmp_path, capsys):
    f = write(tmp_path, "m.yaml", NS, SVC)
    run(capsys, "apply", "-f", f)
    code, out, _ = run(capsys, "delete", "-f", f)
    assert code == 0 and "Service/shop/web deleted" in out
    code, _, err = run(capsys, "get", "svc", "web", "-n", "shop")
    assert code == 1 and "not found" in err


def test_unknown_store_url_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PODNET_STORE", "mysql://x")
    code, _, err = run(capsys, "get", "pods")
    assert code == 1 and err.count("\n") == 1 and "unknown store URL" in err


def test_services_get_unique_cluster_ips_and_keep_them(store, tmp_path, capsys):
    two = SVC + "---\n" + SVC.replace("name: web", "name: api")
    f = write(tmp_path, "m.yaml", NS, two)
    assert run(capsys, "apply", "-f", f, "--service-cidr", "10.97.0.0/24")[0] == 0
    _, out, _ = run(capsys, "get", "svc", "-n", "shop", "-o", "json")
    ips = {i["metadata"]["name"]: i["spec"]["clusterIP"] for i in json.loads(out)["items"]}
    assert len(set(ips.values())) == 2 and all(ip.startswith("10.97.0.") for ip in ips.values())
    run(capsys, "apply", "-f", f, "--service-cidr", "10.97.0.0/24")
    _, out, _ = run(capsys, "get", "svc", "-n", "shop", "-o", "json")
    assert {i["metadata"]["name"]: i["spec"]["clusterIP"] for i in json.loads(out)["items"]} == ips


@pytest.mark.parametrize("argv", [["get"], ["bogus"], ["ipam", "allocate", "--node"], ["apply"]])
def test_usage_mistakes_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    _, err = capsys.readouterr()
    assert ex.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: podnet")


WIDE = ("apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: wide}\n"
        "spec: {cidr: 10.50.0.0/23, blockSize: 24}\n")
NARROW = ("apiVersion: podnet.io/v1\nkind: IPPool\nmetadata: {name: narrow}\n"
          "spec: {cidr: 10.50.0.0/24, blockSize: 26}\n")


def test_overlapping_pools_in_one_apply_are_refused_naming_both(store, tmp_path, capsys):
    f = write(tmp_path, "pools.yaml", NARROW, WIDE)
    code, _, err = run(capsys, "apply", "-f", f)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"error: {f}: document 1 (IPPool/wide): field spec.cidr: 10.50.0.0/23 overlaps "
                           f"IPPool/narrow field spec.cidr 10.50.0.0/24 ({f}: document 0): "
                           "pools must not share addresses")
    code, out, _ = run(capsys, "get", "ippools")
    assert "narrow" not in out and "wide" not in out


def test_pool_overlapping_a_stored_pool_is_refused(store, tmp_path, capsys):
    assert run(capsys, "apply", "-f", write(tmp_path, "narrow.yaml", NARROW))[0] == 0
    f = write(tmp_path, "wide.yaml", WIDE)
    code, _, err = run(capsys, "apply", "-f", f)
    assert code == 1
    assert (f"{f}: document 0 (IPPool/wide): field spec.cidr: 10.50.0.0/23 overlaps IPPool/narrow field "
            "spec.cidr 10.50.0.0/24 (in the store)") in err
    # Re-applying a pool does not collide with its stored self, and disjoint pools are fine.
    assert run(capsys, "apply", "-f", write(tmp_path, "again.yaml", NARROW, POOL))[0] == 0


def test_pool_overlapping_the_service_cidr_is_refused(store, tmp_path, capsys):
    f = write(tmp_path, "p.yaml", POOL.replace("10.244.0.0/16", "10.96.0.0/12"))
    code, _, err = run(capsys, "apply", "-f", f)
    assert code == 1
    assert (f"{f}: document 0 (IPPool/main): field spec.cidr: 10.96.0.0/12 overlaps the Service CIDR "
            "10.96.0.0/12") in err
    code, _, err = run(capsys, "apply", "--service-cidr", "10.244.128.0/20", "-f", write(tmp_path, "q.yaml", POOL))
    assert code == 1 and "overlaps the Service CIDR 10.244.128.0/20" in err


def test_a_misspelt_spec_field_is_refused_naming_file_object_and_field(store, tmp_path, capsys):
    f = write(tmp_path, "svc.yaml", NS, SVC.replace("selector:", "selecter:"))
    code, _, err = run(capsys, "apply", "-f", f)
    assert code == 1
    assert err.strip() == f"error: {f}: document 1 (Service/shop/web): field spec.selecter: unknown field"
    code, out, _ = run(capsys, "get", "ns")
    assert "shop" not in out  # nothing of the set was applied
