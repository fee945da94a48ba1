"""A node's ENI pool from its CloudNetwork, checked against the cloud before it starts.

    select()      the CloudNetwork whose nodeSelector matches the node (none: local IPAM)
    build_pool()  the instance (from the Node's providerID), its type's limits, the
                  subnets and security groups named: each one the cloud does not know is
                  an error naming the CloudNetwork, the field and the API call's code; then
                  the first reconcile, and the manager thread

A cloud that cannot be reached or refuses the credentials is a SetupError too (the call
and its code); the agent keeps serving the node's existing pods and answers ADDs with
"try again later" naming it, and tries again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from podnet.eni.cloud import CloudClient, Subnet
from podnet.eni.errors import CONFIG_CODES, CloudError, SetupError
from podnet.eni.pool import EniPool, PoolConfig, PoolSettings
from podnet.eni.ratelimit import RateLimiter
from podnet.eni.reconcile import Reconciler
from podnet.model.cloud import parse_provider_id
from podnet.model.objects import CloudNetwork, Node
from podnet.model.selectors import LabelSelector
from podnet.store.base import KeyValueStore


def select(networks: list[CloudNetwork], node: Node) -> CloudNetwork | None:
    matching = [n for n in networks if n.spec.node_selector is None or _matches(n.spec.node_selector, node.labels)]
    if len(matching) > 1:
        names = ", ".join(n.ref for n in sorted(matching, key=lambda n: n.name))
        raise SetupError(f"Node/{node.name} is selected by more than one CloudNetwork ({names}): "
                         "narrow their nodeSelectors so that one selects it")
    return matching[0] if matching else None


def _matches(selector: LabelSelector, labels: dict[str, str]) -> bool:
    return selector.matches(labels)


@dataclass
class PoolOptions:
    """Agent-side settings a CloudNetwork does not carry (tests and the benchmark shorten them)."""

    instance_id: str | None = None  # default: from the Node's spec.providerID
    endpoint: str | None = None  # default: the CloudNetwork's, else AWS's
    wait: float = 20.0
    shrink_interval: float = 5.0
    check_interval: float = 5.0
    reconcile_interval: float = 60.0
    subnet_skip: float = 600.0
    client: object | None = None  # a boto3 EC2 client to use instead of making one


def build_pool(network: CloudNetwork, node: Node, kv_factory: Callable[[], KeyValueStore],
               options: PoolOptions | None = None,
               attachment_exists: Callable[[KeyValueStore, str], bool] | None = None) -> EniPool:
    opts = options or PoolOptions()
    spec = network.spec
    instance_id = opts.instance_id
    if instance_id is None:
        if not node.spec.provider_id:
            raise SetupError(f"Node/{node.name}: field spec.providerID is not set: the ENI pool of {network.ref} "
                             "needs the node's instance (aws:///<zone>/i-...), or pass the agent --instance-id")
        try:
            _, instance_id = parse_provider_id(node.spec.provider_id)
        except ValueError as e:
            raise SetupError(f"Node/{node.name}: field spec.providerID: {e}") from None
    limiter = RateLimiter(spec.rate_limits)
    cloud = CloudClient(spec.region, endpoint=opts.endpoint or spec.endpoint, limiter=limiter, client=opts.client)

    def ask(what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except CloudError as e:
            raise SetupError(f"{network.ref}: {what}: {e}") from None

    inst = ask(f"the instance {instance_id} of Node/{node.name}", lambda: cloud.describe_instance(instance_id))
    limits = ask(f"instance type {inst.instance_type} of Node/{node.name}",
                 lambda: cloud.instance_limits(inst.instance_type))
    settings = _settings(network, node.name, inst.zone, cloud, _check_ids(network, cloud))
    cfg = PoolConfig(
        node=node.name, network=network.name, mode=spec.mode, instance_id=instance_id, limits=limits,
        subnets=settings.subnets, subnet_cidrs=settings.subnet_cidrs, security_groups=settings.security_groups,
        min_idle=settings.min_idle, max_idle=settings.max_idle, batch=settings.batch, window=settings.window,
        cooldown=settings.cooldown, leak_grace=settings.leak_grace, wait=opts.wait,
        subnet_skip=opts.subnet_skip, shrink_interval=opts.shrink_interval, check_interval=opts.check_interval,
        reconcile_interval=opts.reconcile_interval, zone=inst.zone,
    )
    reconciler = Reconciler(cfg, cloud, kv_factory, attachment_exists)
    pool = EniPool(cfg, cloud, reconciler=reconciler)
    ask("DescribeNetworkInterfaces of the instance", lambda: reconciler(pool))
    return pool.start()


def _settings(network: CloudNetwork, node: str, zone: str, cloud: CloudClient,
              subnets: dict[str, Subnet]) -> PoolSettings:
    spec = network.spec
    zone_subnets = [s.id for s in spec.subnets if s.zone == zone]
    if not zone_subnets:
        raise SetupError(f"{network.ref}: field spec.subnets: no subnet in zone {zone} of Node/{node}; add one")
    return PoolSettings(
        min_idle=spec.warm_pool.min_idle, max_idle=spec.warm_pool.max_idle, batch=spec.batch_size,
        window=spec.batch_window_milliseconds / 1000.0, cooldown=spec.cooldown_seconds,
        leak_grace=spec.leak_grace_seconds, security_groups=list(spec.security_groups), subnets=zone_subnets,
        subnet_cidrs={s.id: s.cidr for s in subnets.values()}, rate_limits=dict(spec.rate_limits))


# What a running pool cannot take: the agent logs that such a change waits for its restart.
RESTART_FIELDS = (("provider", "spec.provider"), ("region", "spec.region"), ("mode", "spec.mode"),
                  ("endpoint", "spec.endpoint"), ("node_selector", "spec.nodeSelector"))


def reconfigure(pool: EniPool, old: CloudNetwork, new: CloudNetwork) -> tuple[list[str], list[str]]:
    """Take a changed CloudNetwork into the node's running pool: (what changed, the fields
    that wait for the agent's restart). New subnets and security groups are checked with
    the cloud first; one it does not know is a SetupError naming the object and the field,
    and then nothing changes."""
    later = [f for attr, f in RESTART_FIELDS if getattr(old.spec, attr) != getattr(new.spec, attr)]
    if (new.spec.subnets, new.spec.security_groups) != (old.spec.subnets, old.spec.security_groups):
        subnets = _check_ids(new, pool.cloud)
    else:
        subnets = {i: Subnet(i, pool.cfg.zone, c, 0) for i, c in pool.cfg.subnet_cidrs.items()}
    settings = _settings(new, pool.cfg.node, pool.cfg.zone, pool.cloud, subnets)
    return pool.reconfigure(settings), later


def _check_ids(network: CloudNetwork, cloud: CloudClient) -> dict[str, Subnet]:
    """Every subnet and security group the CloudNetwork names exists; else the field at fault."""
    spec = network.spec
    try:
        found = {s.id: s for s in cloud.describe_subnets([s.id for s in spec.subnets])}
    except CloudError as e:
        if e.code not in CONFIG_CODES or e.code != "InvalidSubnetID.NotFound":
            raise SetupError(f"{network.ref}: field spec.subnets: {e}") from None
        found = {}
        for i, s in enumerate(spec.subnets):
            try:
                found.update({x.id: x for x in cloud.describe_subnets([s.id])})
            except CloudError as e2:
                raise SetupError(f"{network.ref}: field spec.subnets[{i}].id: subnet {s.id} does not exist ({e2})"
                                 ) from None
    for i, s in enumerate(spec.subnets):
        got = found.get(s.id)
        if got is None:
            raise SetupError(f"{network.ref}: field spec.subnets[{i}].id: subnet {s.id} does not exist")
        if got.zone and got.zone != s.zone:
            raise SetupError(f"{network.ref}: field spec.subnets[{i}].zone: subnet {s.id} is in {got.zone}, "
                             f"not {s.zone}")
    if not spec.security_groups:
        return found
    try:
        cloud.describe_security_groups(spec.security_groups)
    except CloudError as e:
        if e.code != "InvalidGroup.NotFound":
            raise SetupError(f"{network.ref}: field spec.securityGroups: {e}") from None
        for i, g in enumerate(spec.security_groups):
            try:
                cloud.describe_security_groups([g])
            except CloudError as e2:
                raise SetupError(f"{network.ref}: field spec.securityGroups[{i}]: security group {g} does not "
                                 f"exist ({e2})") from None
    return found
