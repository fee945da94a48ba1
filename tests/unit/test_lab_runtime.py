"""The conflist runtime against fake plugins: what each plugin is given, in what order, and errors."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from podnet.lab.runtime import CNIError, CniRuntime, RuntimeConf, k8s_args

# A fake plugin: logs its command, env and stdin; answers per FAKE_<TYPE>_<COMMAND> in its config.
FAKE = r'''#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"type": conf["type"], "cmd": cmd, "conf": conf,
                        "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}}}) + "\n")
fail = conf.get("fail", {{}}).get(cmd)
if fail:
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": fail[0], "msg": fail[1], "details": "d"}}))
    sys.exit(1)
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": "1.1.0", "supportedVersions": conf.get("versions", ["1.0.0", "1.1.0"])}}))
elif cmd == "ADD":
    prev = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
    if conf.get("ip"):
        prev = {{**prev, "interfaces": prev["interfaces"] + [{{"name": "eth0", "sandbox": os.environ["CNI_NETNS"]}}],
                "ips": prev["ips"] + [{{"address": conf["ip"], "interface": len(prev["interfaces"])}}]}}
    prev = {{**prev, "seen": prev.get("seen", []) + [conf["type"]]}}
    print(json.dumps(prev))
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("main", "chained", "other"):
        p = bindir / name
        p.write_text(FAKE.format(python=sys.executable))
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("CNI_IFNAME", "stale")  # a runtime's own CNI_ variables never leak through

    def calls() -> list[dict]:
        out = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return out

    return bindir, calls


def runtime(tmp_path, bindir, *plugins, version="1.0.0"):
    return CniRuntime({"cniVersion": version, "name": "net", "plugins": list(plugins)},
                      cni_path=[str(tmp_path / "nowhere"), str(bindir)], cache_dir=tmp_path / "cache")


RT = RuntimeConf(container_id="c1", netns="/run/netns/pod", args=k8s_args("ns", "pod", "c1", "uid1"),
                 capability_args={"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}],
                                  "bandwidth": {"ingressRate": 1000}})


def test_add_chains_results_and_injects_name_version_capabilities(tmp_path, plugins):
    bindir, calls = plugins
    rt = runtime(tmp_path, bindir, {"type": "main", "ip": "10.0.0.5/32"},
                 {"type": "chained", "capabilities": {"portMappings": True, "bandwidth": False}})
    result = rt.add(RT)
    assert result["seen"] == ["main", "chained"] and result["ips"][0]["address"] == "10.0.0.5/32"
    first, second = calls()
    assert first["cmd"] == second["cmd"] == "ADD"
    assert first["conf"]["name"] == "net" and first["conf"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in first["conf"] and "runtimeConfig" not in first["conf"]
    assert second["conf"]["prevResult"]["seen"] == ["main"]
    assert second["conf"]["runtimeConfig"] == {"portMappings": RT.capability_args["portMappings"]}
    env = first["env"]
    assert env["CNI_CONTAINERID"] == "c1" and env["CNI_NETNS"] == "/run/netns/pod" and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == ("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;"
                               "K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=uid1")
    assert env["CNI_PATH"] == os.pathsep.join([str(tmp_path / "nowhere"), str(bindir)])
    assert rt.cached_result(RT) == result


def test_del_runs_in_reverse_with_the_cached_result(tmp_path, plugins):
    bindir, calls = plugins
    rt = runtime(tmp_path, bindir, {"type": "main"}, {"type": "chained"})
    result = rt.add(RT)
    calls()
    rt.delete(RT)
    dels = calls()
    assert [c["type"] for c in dels] == ["chained", "main"]
    assert all(c["cmd"] == "DEL" and c["conf"]["prevResult"] == result for c in dels)
    assert rt.cached(RT) is None
    rt.delete(RT)  # no cache: DEL still runs, without prevResult
    assert all("prevResult" not in c["conf"] for c in calls())


def test_check_needs_a_cached_result_and_runs_in_order(tmp_path, plugins):
    bindir, calls = plugins
    rt = runtime(tmp_path, bindir, {"type": "main"}, {"type": "chained"})
    with pytest.raises(CNIError, match="no cached result"):
        rt.check(RT)
    rt.add(RT)
    calls()
    rt.check(RT)
    assert [(c["type"], c["cmd"]) for c in calls()] == [("main", "CHECK"), ("chained", "CHECK")]
    old = runtime(tmp_path, bindir, {"type": "main"}, version="0.3.1")
    with pytest.raises(CNIError, match="does not support CHECK"):
        old.check(RT)


def test_failed_add_raises_the_plugin_error_and_deletes_what_ran(tmp_path, plugins):
    bindir, calls = plugins
    rt = runtime(tmp_path, bindir, {"type": "main"}, {"type": "chained", "fail": {"ADD": [11, "try again"]}},
                 {"type": "other"})
    with pytest.raises(CNIError) as err:
        rt.add(RT)
    e = err.value
    assert (e.plugin, e.command, e.code, e.msg, e.details) == ("chained", "ADD", 11, "try again", "d")
    assert "try again (code 11)" in str(e)
    assert [(c["type"], c["cmd"]) for c in calls()] == [
        ("main", "ADD"), ("chained", "ADD"), ("chained", "DEL"), ("main", "DEL")]
    assert rt.cached(RT) is None


def test_gc_deletes_stale_attachments_then_asks_plugins(tmp_path, plugins):
    bindir, calls = plugins
    rt = runtime(tmp_path, bindir, {"type": "main"}, version="1.1.0")
    keep = RuntimeConf(container_id="keep", netns="/run/netns/a")
    stale = RuntimeConf(container_id="stale", netns="/run/netns/b", args=[("K8S_POD_NAME", "b")])
    rt.add(keep)
    rt.add(stale)
    # Another network's cache entry is never touched.
    CniRuntime({"cniVersion": "1.0.0", "name": "elsewhere", "plugins": [{"type": "other"}]},
               cni_path=[str(bindir)], cache_dir=tmp_path / "cache").add(RuntimeConf("x", "/run/netns/x"))
    calls()
    assert rt.gc([("keep", "eth0")]) == [("stale", "eth0")]
    deleted, gc = calls()
    assert deleted["cmd"] == "DEL" and deleted["env"]["CNI_CONTAINERID"] == "stale"
    assert deleted["env"]["CNI_NETNS"] == "/run/netns/b" and deleted["env"]["CNI_ARGS"] == "K8S_POD_NAME=b"
    assert gc["cmd"] == "GC" and "CNI_CONTAINERID" not in gc["env"]
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    assert gc["conf"]["cni.dev/valid-attachments"] == valid and gc["conf"]["cni.dev/attachments"] == valid
    assert [a["containerId"] for a in rt.cached_attachments()] == ["keep"]


def test_status_and_version(tmp_path, plugins):
    bindir, calls = plugins
    runtime(tmp_path, bindir, {"type": "main"}).status()
    assert calls() == []  # before 1.1.0 there is no STATUS
    rt = runtime(tmp_path, bindir, {"type": "main"}, {"type": "chained", "fail": {"STATUS": [50, "not ready"]}},
                 version="1.1.0")
    with pytest.raises(CNIError) as err:
        rt.status()
    assert err.value.code == 50 and err.value.plugin == "chained"
    assert rt.plugin_versions("main") == ["1.0.0", "1.1.0"]


def test_broken_plugins_and_configs(tmp_path, plugins):
    bindir, _ = plugins
    with pytest.raises(CNIError, match="failed to find plugin 'absent'"):
        runtime(tmp_path, bindir, {"type": "absent"}).add(RT)
    noisy = bindir / "noisy"
    noisy.write_text("#!/bin/sh\necho 'panic: boom' >&2\nexit 2\n")
    noisy.chmod(0o755)
    with pytest.raises(CNIError) as err:
        runtime(tmp_path, bindir, {"type": "noisy"}).add(RT)
    assert err.value.code == 999 and "status 2" in err.value.msg and "panic: boom" in err.value.details
    with pytest.raises(CNIError, match="no plugins"):
        CniRuntime({"name": "x", "plugins": []}, cni_path=[], cache_dir=tmp_path)
    with pytest.raises(CNIError, match="has no type"):
        CniRuntime({"name": "x", "plugins": [{}]}, cni_path=[], cache_dir=tmp_path)
    rt = CniRuntime(json.dumps({"cniVersion": "1.0.0", "name": "s", "plugins": [{"type": "main"}]}),
                    cni_path=[str(bindir)], cache_dir=tmp_path / "c")
    assert rt.name == "s" and Path(rt.cache_dir) == tmp_path / "c"
