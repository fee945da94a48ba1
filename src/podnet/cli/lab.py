"""`podnet lab up|status|exec|down|probe`: a cluster emulated in network namespaces on this host."""

from __future__ import annotations

import argparse
import os
import subprocess

from podnet.cli.output import EXIT_FOUND, Column, add_output_flag, emit, is_table, print_table
from podnet.errors import PodnetError


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="emulate a cluster in network namespaces on this host (needs root)")
    lab.add_argument("--name", dest="lab_name", metavar="NAME", help="the lab (default: the only one that is up)")
    lsub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    lsub.required = True

    p = lsub.add_parser("up", help="create the namespaces, start agents and pods from a lab file")
    p.add_argument("file", metavar="FILE", help="lab file (kind: Lab)")
    p.add_argument("--name", dest="name", help="lab name (default: metadata.name)")
    p.add_argument("--store", dest="lab_store", metavar="URL",
                   help="store URL (default: a SQLite file in the lab's directory; $PODNET_STORE is not used)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for agents and servers")
    p.add_argument("--keep-on-failure", action="store_true", help="leave a failed lab in place to debug it")
    p.add_argument("--source", choices=("store", "kubernetes"), default="store",
                   help="where the objects come from: written into the store (default), or created through a "
                        "Kubernetes API server the lab runs, with podnet kube-sync filling the store")
    p.set_defaults(func=cmd_up)

    p = lsub.add_parser("status", help="nodes, agents and pods of a lab")
    p.add_argument("--name", dest="name")
    add_output_flag(p)
    p.set_defaults(func=cmd_status)

    p = lsub.add_parser("exec", help="run a command in a pod's (or node's) network namespace")
    p.add_argument("--name", dest="name")
    p.add_argument("--node", action="store_true", help="TARGET is a node, not a pod")
    p.add_argument("target", metavar="POD", help="pod as NAME or NAMESPACE/NAME (a node with --node)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    p.set_defaults(func=cmd_exec)

    p = lsub.add_parser("probe", help="probe pod-to-pod, pod-to-external, node-to-pod and NodePort connectivity "
                                      f"(exit {EXIT_FOUND} if a path is not as expected)")
    p.add_argument("--name", dest="name")
    p.add_argument("--timeout", type=float, default=2.0)
    add_output_flag(p)
    p.set_defaults(func=cmd_probe)

    p = lsub.add_parser("down", help="remove everything a lab made (a no-op when nothing is up)")
    p.add_argument("--name", dest="name")
    p.set_defaults(func=cmd_down)


def _name(args: argparse.Namespace) -> str | None:
    return getattr(args, "name", None) or getattr(args, "lab_name", None)


def _say(line: str) -> None:
    print(line, flush=True)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PodnetError(f"podnet lab {what} needs root (it creates and enters network namespaces)")


def cmd_up(args: argparse.Namespace) -> int:
    from podnet.cli.common import store_credentials
    from podnet.lab.cluster import up
    from podnet.lab.spec import load_lab

    spec = load_lab(args.file)
    _need_root("up")
    store = args.lab_store or getattr(args, "store", None)
    st = up(spec, name=_name(args), store_url=store, timeout=args.timeout, keep_on_failure=args.keep_on_failure,
            say=_say, store_credentials=store_credentials(args), source=args.source)
    print(f"lab {st.name} is up: `podnet lab status --name {st.name}`, `podnet lab down --name {st.name}`")
    return 0


NODE_COLUMNS = [
    Column("NODE", lambda n: n["name"]),
    Column("ADDRESS", lambda n: n["address"]),
    Column("NETNS", lambda n: n["netns"]),
    Column("AGENT", lambda n: n["agent"]),
    Column("DNS", lambda n: n.get("dns")),
    Column("POD-CIDR", lambda n: n.get("podCIDR"), wide=True),
    Column("LOG", lambda n: n.get("log"), wide=True),
]

POD_COLUMNS = [
    Column("POD", lambda p: f"{p['namespace']}/{p['name']}"),
    Column("NODE", lambda p: p["node"]),
    Column("IP", lambda p: p["ips"]),
    Column("NETNS", lambda p: p["netns"]),
    Column("SERVER", lambda p: p["server"]),
    Column("READY", lambda p: p.get("ready"), wide=True),
]


def cmd_status(args: argparse.Namespace) -> int:
    from podnet.lab.cluster import find_lab, status

    info = status(find_lab(_name(args)))
    if not is_table(args.output):
        emit(info, args.output)
        return 0
    wide = args.output == "wide"
    print(f"lab {info['name']} (id {info['id']}): {info['phase']}")
    if info.get("error"):
        print(f"  error: {info['error']}")
    print(f"  state: {info['dir']}")
    print(f"  store: {info['store']}")
    print(f"  underlay: {info['underlay']} (netns {info['underlayNetns']})")
    if info.get("apiServer"):
        print(f"  API server: {info['apiServer']}")
        print(f"  kube-sync: {info['kubeSync']}")
    if info.get("endpointController"):
        print(f"  endpoint controller: {info['endpointController']}")
    if info.get("external"):
        dns = f", dns {info['externalDns']}" if info.get("externalDns") else ""
        print(f"  external: {info['external']} (server {info['externalServer']}{dns})")
    print()
    print_table(NODE_COLUMNS, info["nodes"], wide=wide)
    print()
    print_table(POD_COLUMNS, info["pods"], wide=wide)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from podnet.lab.cluster import exec_argv, find_lab, find_node, find_pod

    _need_root("exec")
    st = find_lab(_name(args))
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    netns = find_node(st, args.target)["netns"] if args.node else find_pod(st, args.target)["netns"]
    argv = exec_argv(netns, cmd)
    try:
        return subprocess.run(argv, check=False).returncode
    except OSError as e:
        raise PodnetError(f"cannot run {cmd[0]}: {e.strerror}") from None


def cmd_probe(args: argparse.Namespace) -> int:
    from podnet.lab.cluster import find_lab
    from podnet.lab.connectivity import Lab, format_table, probe_all

    lab = Lab(find_lab(_name(args)))
    rows = probe_all(lab, timeout=args.timeout)
    if is_table(args.output):
        print(format_table(rows, wide=args.output == "wide"))
    else:
        emit([r.as_dict() for r in rows], args.output)
    return 0 if all(r.ok for r in rows) else EXIT_FOUND


def cmd_down(args: argparse.Namespace) -> int:
    from podnet.lab.cluster import down_by_name

    removed = down_by_name(_name(args), say=_say)
    print(f"lab {', '.join(removed)} is down" if removed else "no lab to take down")
    return 0
