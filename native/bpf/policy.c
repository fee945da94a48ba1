// SPDX-License-Identifier: GPL-2.0
/* NetworkPolicy at a pod's host-side veth: the policy compiler's state as maps
 * (src/podnet/policy/ebpf/maps.py writes them, docs/ebpf.md "Policy" explains them).
 *
 *   from_pod  (tc ingress, prio 2, after Service DNAT): the pod's egress policy
 *   to_pod    (tc egress,  prio 1, before reverse NAT): the pod's ingress policy
 *
 * podnet_pol_pods   every local pod's address -> its group per direction (0: open)
 * podnet_pol_groups group -> (rule count, generation): the set of policies selecting a pod
 * podnet_pol_rules  (group, generation, index) -> one rule: peer set x port match
 * podnet_pol_peers  LPM trie (set, address/prefix): pod selectors and ipBlocks minus except;
 *                   set 0: the Service CIDRs
 * podnet_pol_ports  (set, address, port): named ports resolved on their pods
 * podnet_pol_flows  LRU (5-tuple, ends in a fixed order) -> which (direction, orientation)
 *                   a policy admitted, so later packets and the replies pass with one
 *                   lookup (our own table, not the kernel's conntrack: see docs/ebpf.md)
 * podnet_pol_verdicts LRU (group, generation, epoch, local, peer, port, protocol) -> the
 *                   walk's verdict: a new connection between the same two pods and port
 *                   skips the walk. The programmer bumps podnet_pol_epoch after every
 *                   change, so no verdict outlives the state it was computed from.
 *
 * Maps are pinned by name in the agent's pin directory (src/podnet/ebpf/bpffs.py):
 * they outlive the agent, so a restart keeps every admitted connection.
 *
 * Fails closed: a local address without an entry, a group without a header or a rule
 * list with a hole drops the packet. Every packet policy passes carries POL_PASSED_MARK
 * to the guard (last filter at both hooks), which clears it and drops what lacks it: a
 * policy filter deleted behind the agent's back drops until the agent re-attaches it,
 * where the other filters of the hook would pass the packet.
 */
#include "podnet_bpf.h"

#define POL_INGRESS 0
#define POL_EGRESS 1

#define POL_ANY_PEER 0x01 /* the rule has no peer set: every peer */
#define POL_ANY_PORT 0x02 /* no port match: every protocol and port */
#define POL_RANGE 0x04    /* ports lo..hi of proto (neither flag: every port of proto) */
#define POL_NAMED 0x08    /* destination address . port in port_set */

/* Set by policy on a passed packet, cleared by the guard in the same hook run (a mark
 * does not cross into the pod's namespace: the veth scrubs it). Reserved for this. */
#define POL_PASSED_MARK 0x00400000

/* The peer set holding the Service CIDRs (compiled sets are numbered by a hash, never 0) */
#define POL_SERVICE_CIDRS 0

#define POL_MAX_RULES 65536 /* bound of one group's rule walk */
#define POL_TCP_IDLE_NS (6ULL * 3600 * 1000000000ULL)
#define POL_OTHER_IDLE_NS (180ULL * 1000000000ULL)
#define POL_REFRESH_NS 1000000000ULL /* a flow's last-seen time is kept to the second */

struct pol_pod {
	__u64 group[2]; /* by POL_INGRESS / POL_EGRESS; 0: not isolated */
};

struct pol_group {
	__u32 count;
	__u32 gen;
};

struct pol_rule_key {
	__u64 group;
	__u32 gen;
	__u32 index;
};

struct pol_rule {
	__u64 peer_set;
	__u64 port_set;
	__u16 lo; /* host byte order */
	__u16 hi;
	__u8 proto;
	__u8 flags;
	__u16 pad;
};

struct pol_peer_key {
	__u32 prefixlen; /* 64 (the set) + the prefix length of addr */
	__u32 set_lo;
	__u32 set_hi;
	__u32 addr;
};

struct pol_port_key {
	__u64 set;
	__u32 addr;
	__u16 port; /* network byte order, as in the packet */
	__u16 pad;
};

/* One entry per connection: the lower address (then port) first, whichever end sent
 * the packet, so a packet and its reply find the same entry. */
struct pol_flow_key {
	__u32 addr_a;
	__u32 addr_b;
	__u16 port_a;
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};

struct pol_flow {
	__u64 seen;  /* last seen, ns since boot (kept to the second) */
	__u32 admitted; /* bit (direction * 2 + orientation): 1 orientation = sent by end b */
	__u32 pad;
	/* `admitted` is or-ed without an atomic: two sides admitting at the same instant may
	 * lose one bit, and that side's next packet is judged again (a cached verdict). */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pol_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pol_group);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pol_rule_key);
	__type(value, struct pol_rule);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pol_peer_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pol_port_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pol_flow_key);
	__type(value, struct pol_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_flows SEC(".maps");

struct pol_verdict_key {
	__u64 group;
	__u32 gen; /* 0: the epoch retires verdicts of every change (kept: the map's key size) */
	__u32 epoch;
	__u32 local;
	__u32 peer;
	__u16 dport;
	__u8 proto;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pol_verdict_key);
	__type(value, __u32); /* 1: admitted, 0: dropped */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_pol_epoch SEC(".maps");

struct pol_eval {
	__u64 group;
	__u32 gen;
	__u32 peer;  /* the other end's address */
	__u32 dst;   /* the destination's address: named ports resolve on it */
	__u16 dport; /* network byte order */
	__u8 proto;
	__u8 allowed;
};

static __always_inline int pol_in_set(__u64 set, __u32 addr)
{
	struct pol_peer_key k = {
		.prefixlen = 96, .set_lo = (__u32)set, .set_hi = (__u32)(set >> 32), .addr = addr,
	};
	return bpf_map_lookup_elem(&podnet_pol_peers, &k) != NULL;
}

static __always_inline int pol_rule_matches(const struct pol_rule *r, const struct pol_eval *e)
{
	if (!(r->flags & POL_ANY_PORT)) {
		if (r->proto != e->proto)
			return 0;
		if (r->flags & POL_NAMED) {
			struct pol_port_key pk = { .set = r->port_set, .addr = e->dst, .port = e->dport };

			if (!bpf_map_lookup_elem(&podnet_pol_ports, &pk))
				return 0;
		} else if (r->flags & POL_RANGE) {
			__u16 port = bpf_ntohs(e->dport);

			if (port < r->lo || port > r->hi)
				return 0;
		}
	}
	if (!(r->flags & POL_ANY_PEER) && !pol_in_set(r->peer_set, e->peer))
		return 0;
	return 1;
}

static long pol_eval_rule(__u32 index, void *data)
{
	struct pol_eval *e = data;
	struct pol_rule_key k = { .group = e->group, .gen = e->gen, .index = index };
	struct pol_rule *r = bpf_map_lookup_elem(&podnet_pol_rules, &k);

	if (!r)
		return 1; /* a hole in the list: stop, nothing more is admitted */
	if (pol_rule_matches(r, e)) {
		e->allowed = 1;
		return 1;
	}
	return 0;
}

/* Is addr one of this node's own addresses? (the kernel would not forward it) */
static __always_inline int pol_to_node(struct __sk_buff *skb, struct podnet_pkt *p)
{
	struct bpf_fib_lookup fib = {};

	fib.family = 2; /* AF_INET */
	fib.ifindex = skb->ingress_ifindex;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.l4_protocol = p->proto;
	fib.tot_len = skb->len - ETH_HLEN;
	return bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* The local pod's group's verdict on this packet: cached per (group, epoch, local pod,
 * peer, port, protocol), else walked. No generation in the key (the field stays 0): the
 * programmer bumps the epoch after every change, rule changes included, so the group's
 * header is only read on a miss. */
static __always_inline int pol_verdict(struct __sk_buff *skb, struct podnet_pkt *p, __u8 dir, __u64 group,
				       __u32 local)
{
	__u32 zero = 0, *epoch = bpf_map_lookup_elem(&podnet_pol_epoch, &zero);
	struct pol_verdict_key vk = {};
	struct pol_eval e = {};
	struct pol_group *g;
	__u32 *cached, verdict = 0;

	if (!epoch)
		return 0;
	vk.group = group;
	vk.epoch = *epoch;
	vk.local = local;
	vk.peer = dir == POL_INGRESS ? p->saddr : p->daddr;
	vk.dport = p->first_frag ? p->dport : 0;
	vk.proto = p->proto;
	cached = bpf_map_lookup_elem(&podnet_pol_verdicts, &vk);
	if (cached)
		return *cached;
	if (dir == POL_EGRESS) {
		/* A Service address seen here was not translated (no eBPF Service program in
		 * front: its nftables floor DNATs after tc): its endpoints cannot be judged, so it
		 * is dropped, never admitted by an ipBlock that covers it nor as unrouted. */
		if (pol_in_set(POL_SERVICE_CIDRS, p->daddr))
			goto cache;
		/* a pod and its own node always reach each other; not cached (the node's
		 * addresses change without an epoch bump, and a stale "node" would admit) */
		if (pol_to_node(skb, p))
			return 1;
	}
	g = bpf_map_lookup_elem(&podnet_pol_groups, &group);
	if (!g)
		return 0; /* not cached: the header may be on its way */
	e.group = group;
	e.gen = g->gen;
	e.peer = vk.peer;
	e.dst = p->daddr;
	e.dport = vk.dport;
	e.proto = p->proto;
	bpf_loop(g->count < POL_MAX_RULES ? g->count : POL_MAX_RULES, pol_eval_rule, &e, 0);
	verdict = e.allowed;
cache:
	bpf_map_update_elem(&podnet_pol_verdicts, &vk, &verdict, BPF_ANY);
	return verdict;
}

/* The packet's connection key; returns the packet's orientation (0: sent by end a). */
static __always_inline __u32 pol_flow_key_of(struct podnet_pkt *p, struct pol_flow_key *k)
{
	__u32 b_first = p->saddr > p->daddr || (p->saddr == p->daddr && p->sport > p->dport);

	k->addr_a = b_first ? p->daddr : p->saddr;
	k->addr_b = b_first ? p->saddr : p->daddr;
	k->port_a = b_first ? p->dport : p->sport;
	k->port_b = b_first ? p->sport : p->dport;
	k->proto = p->proto;
	return b_first;
}

#define POL_ADMITTED(dir, orient) (1U << ((dir) * 2 + (orient)))

/* ICMP echo's identifier stands in for both ports, so a ping's reply finds its flow. */
static __always_inline void pol_icmp_ports(struct __sk_buff *skb, struct podnet_pkt *p)
{
	__u8 h[6]; /* type, code, checksum, identifier */

	if (p->proto != IPPROTO_ICMP || !p->first_frag ||
	    bpf_skb_load_bytes(skb, p->l4_off, h, sizeof(h)) < 0)
		return;
	if (h[0] == 8 || h[0] == 0) { /* echo request, echo reply */
		__builtin_memcpy(&p->sport, &h[4], 2);
		p->dport = p->sport;
	}
}

static __always_inline int pol_judge(struct __sk_buff *skb, __u8 dir)
{
	struct podnet_pkt p;
	struct pol_pod *pod;
	struct pol_flow_key k = {};
	struct pol_flow *f;
	__u32 local, o, bit;
	__u64 now, group, other, idle;
	int live;

	if (podnet_parse(skb, &p) < 0)
		return TC_ACT_UNSPEC; /* not IPv4: NetworkPolicy here is IPv4's */
	pol_icmp_ports(skb, &p);
	local = dir == POL_INGRESS ? p.daddr : p.saddr;
	pod = bpf_map_lookup_elem(&podnet_pol_pods, &local);
	if (!pod)
		return TC_ACT_SHOT; /* not an address podnet gave a pod of this node */
	group = pod->group[dir & 1];
	other = pod->group[!dir];
	if (!group && !other)
		return TC_ACT_UNSPEC; /* open both ways: no flow to remember */
	if (!group && p.proto == IPPROTO_TCP &&
	    (p.tcp_flags & (PODNET_TCP_SYN | PODNET_TCP_ACK)) != PODNET_TCP_SYN)
		return TC_ACT_UNSPEC; /* open this way: of TCP, only a connection's first packet is remembered */

	/* Admitted already in this direction and orientation, or a reply: admitted the other
	 * way round in the other direction. One lookup, kept for the admission below. The
	 * coarse clock (a tick's resolution) is enough for idle times of minutes and hours. */
	now = bpf_ktime_get_coarse_ns();
	idle = p.proto == IPPROTO_TCP ? POL_TCP_IDLE_NS : POL_OTHER_IDLE_NS;
	o = pol_flow_key_of(&p, &k);
	bit = POL_ADMITTED(dir, o);
	f = bpf_map_lookup_elem(&podnet_pol_flows, &k);
	live = f && (__s64)(now - f->seen) <= (__s64)idle; /* (seen ahead of now: live) */
	if (live && (f->admitted & (bit | POL_ADMITTED(!dir, !o)))) {
		if ((__s64)(now - f->seen) > (__s64)POL_REFRESH_NS)
			f->seen = now; /* not on every packet: a written cache line is shared by every CPU */
		return TC_ACT_UNSPEC;
	}
	/* a pod and its own node always reach each other (from the node: no input interface) */
	if (group && !(dir == POL_INGRESS && skb->ingress_ifindex == 0) &&
	    !pol_verdict(skb, &p, dir, group, local))
		return TC_ACT_SHOT;
	/* remembered: later packets skip the rules, and the reply passes the other way */
	if (live) {
		/* the other end's pod (same node) admitted it already: add this side in place */
		f->admitted |= bit;
		f->seen = now;
	} else {
		struct pol_flow fresh = { .seen = now, .admitted = bit };

		bpf_map_update_elem(&podnet_pol_flows, &k, &fresh, BPF_ANY);
	}
	return TC_ACT_UNSPEC;
}

static __always_inline int pol_enforce(struct __sk_buff *skb, __u8 dir)
{
	int verdict = pol_judge(skb, dir);

	if (verdict == TC_ACT_UNSPEC)
		skb->mark |= POL_PASSED_MARK;
	return verdict;
}

SEC("tc")
int podnet_pol_from_pod(struct __sk_buff *skb)
{
	return pol_enforce(skb, POL_EGRESS);
}

SEC("tc")
int podnet_pol_to_pod(struct __sk_buff *skb)
{
	return pol_enforce(skb, POL_INGRESS);
}

/* Last at both hooks: only what policy passed goes on (policy's filter missing: drop). */
SEC("tc")
int podnet_pol_guard(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC; /* policy passes it too (ARP keeps the neighbours resolved) */
	if (!(skb->mark & POL_PASSED_MARK))
		return TC_ACT_SHOT;
	skb->mark &= ~POL_PASSED_MARK;
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "GPL";
