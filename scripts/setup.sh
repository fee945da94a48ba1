#!/usr/bin/env bash
# Installs everything podnet uses on a fresh Debian machine (run as root):
# the kernel tools, etcd, BIRD, the reference CNI plugins, DNS and traffic tools,
# a C compiler for the CNI plugin, clang for the eBPF programs, and a virtualenv with podnet installed in it.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nftables iproute2 iptables ipset conntrack   # kernel dataplane
  etcd-server etcd-client openssl              # distributed store (openssl: its TLS tests' certificates)
  bird2                                        # BGP
  containernetworking-plugins                  # reference CNI plugins (/usr/lib/cni)
  bind9-dnsutils dnsperf unbound dnsmasq-base  # DNS clients, servers, load
  iperf3 socat iputils-ping procps             # traffic and process tools
  bind9                                        # external DNS server (RFC 2136 target of `podnet external-dns`)
  gcc libc6-dev                                # the CNI plugin, linked statically (libc.a)
  clang libbpf-dev libbpf1 bpftool             # the eBPF dataplane: programs built for the BPF target, loaded by libbpf
)

# kubectl: a real client the fake API server of the tests is proven with (tests/kube).
# Debian's kubernetes-client, unless a kubectl is installed already (its package owns
# /usr/bin/kubectl too).
command -v kubectl >/dev/null 2>&1 || APT_PACKAGES+=(kubernetes-client)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # bind9's package starts and enables a system named on port 53. podnet's tests and
  # benchmarks start their own named (own config, a free loopback port, stopped by
  # PID), so the one the package installs is stopped and disabled, nothing else.
  if [[ " ${missing[*]} " == *" bind9 "* ]]; then
    if [ -d /run/systemd/system ]; then
      systemctl disable --now named.service >/dev/null 2>&1 || true
    else
      invoke-rc.d named stop >/dev/null 2>&1 || true
      systemctl disable named.service >/dev/null 2>&1 || true
    fi
    update-rc.d named disable >/dev/null 2>&1 || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Re-install only when the project metadata changed.
stamp=.venv/.podnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
# The CNI plugin, where container runtimes look for plugins: compiled into build/
# (again only when its source changed), then copied to /opt/cni/bin when that copy
# differs, through a temporary file renamed over it. A static executable: it needs
# nothing of this checkout or its virtualenv.
.venv/bin/python -m podnet.cni.install /opt/cni/bin >/dev/null
# The eBPF programs: every native/bpf/*.c into build/bpf/*.o, again only when a source
# or a shared header changed (the agent loads them from there).
.venv/bin/python -m podnet.ebpf.build >/dev/null
echo "setup: ok"
