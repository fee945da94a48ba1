/* podnet's Service load balancer on tc (`podnet agent --service-proxy ebpf`).
 *
 * podnet_svc_from_pod (ingress of a pod's host-side veth, prio 1): a packet to a Service
 * frontend (ClusterIP, externalIP, LoadBalancer IP: address, protocol, port) gets a
 * backend's address and port before the node routes it; the choice is kept in the
 * connection map `ct` so every later packet of the flow goes to the same backend.
 * podnet_svc_to_pod (egress, prio 2): a reply of such a flow gets the frontend's address and
 * port back (reverse NAT) before the pod sees it.
 *
 * The maps are the desired state podnet's agent writes (src/podnet/services/ebpf/,
 * whose maps.py mirrors every struct here) plus what the programs keep themselves
 * (ct, affinity, per-backend connection counts). Encodings: addresses and ports in
 * network byte order, the rest in host order.
 */
#include "podnet_bpf.h"

#define SVC_F_NO_EP_DROP 0x1     /* no endpoints: drop (else reject) */
#define SVC_F_AFFINITY   0x2     /* sessionAffinity ClientIP */
#define SVC_F_MASQ       0x4     /* SNAT to the node (NodePort, external IPs under eTP Cluster) */
#define SVC_F_SRC_RANGES 0x8     /* loadBalancerSourceRanges: only sources in podnet_svc_src_ranges */
#define SVC_SCHED_SHIFT  8       /* scheduler in bits 8..11 */
#define SVC_SCHED_RANDOM 0
#define SVC_SCHED_LC     1       /* least connection: the backend with the fewest open TCP flows */
#define SVC_SCHED_SH     2       /* source hash: a client address always gets the same slot */
#define SVC_SCHED_WRR    3       /* weighted: the agent repeats a backend's slot by its weight */
#define LC_SCAN_MAX      64      /* least connection looks at this many slots at most */

/* Packets the program wants rejected (a ClusterIP without that port, a Service without
 * endpoints) carry this mark; the agent's small nftables table answers them with a TCP
 * reset or an ICMP port unreachable, as the nftables backend does. */
#define SVC_REJECT_MARK  0x00200000
/* Flows to masquerade carry kube-proxy's mark; the same table's postrouting chain
 * masquerades them, and the kernel's conntrack undoes it on the replies before
 * podnet_svc_to_pod restores the frontend (services/model.py MASQUERADE_MARK). */
#define SVC_MASQ_MARK    0x00004000

#define CT_DIR_FWD 0
#define CT_DIR_REV 1
#define CT_F_CLOSED 0x1          /* a FIN or RST was seen: no longer counted as open */

struct frontend_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct frontend {
	__u32 id;             /* service id: key of its slots */
	__u32 count;          /* slots 0..count-1 */
	__u32 flags;          /* SVC_F_*, scheduler */
	__u32 affinity_timeout;  /* seconds */
	__u32 affinity_key;   /* shared by the frontends of one Service port */
};

struct slot_key {
	__u32 id;
	__u32 slot;
};

struct backend {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct ct_key {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct ct_entry {
	__u32 addr;           /* fwd: the backend's; rev: the frontend's */
	__u16 port;
	__u16 flags;
	__u32 backend_id;
	__u32 svc_id;
};

struct affinity_key {
	__u32 client;
	__u32 affinity_key;
};

struct affinity {
	__u64 seen_ns;
	__u32 backend_id;
	__u32 pad;
};

struct cidr_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct frontend_key);
	__type(value, struct frontend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_backends SEC(".maps");

/* open TCP flows per backend id, kept by the programs (least connection) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, __s64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_conns SEC(".maps");

/* every allocated ClusterIP (a port it does not have is rejected) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_cluster_ips SEC(".maps");

/* Who is asking: the role of the interface a packet came in on (podnet_svc_ifaces), and
 * for a frontend whose endpoints differ for clients from the underlay (externalIPs,
 * LoadBalancer IPs and NodePorts of an externalTrafficPolicy Local Service: only this
 * node's endpoints, while the node's pods may use every one) that other view. */
#define IF_ROLE_POD      1
#define IF_ROLE_UNDERLAY 2

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct frontend_key);
	__type(value, struct frontend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_external SEC(".maps");

/* loadBalancerSourceRanges: (service id, source prefix); the prefix length counts the id's 32 bits */
struct src_range_key {
	__u32 prefixlen;
	__u32 id;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct src_range_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_src_ranges SEC(".maps");

/* the node's addresses: a packet to one of them may be for a NodePort (address 0) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_node_ips SEC(".maps");

/* the Service CIDRs: an address there that no Service has is dropped */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__type(key, struct cidr_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_affinity SEC(".maps");

static __always_inline int reject(struct __sk_buff *skb)
{
	skb->mark |= SVC_REJECT_MARK;
	return TC_ACT_UNSPEC;
}

static __always_inline struct backend *backend_of_slot(__u32 id, __u32 slot, __u32 *backend_id)
{
	struct slot_key sk = { .id = id, .slot = slot };
	__u32 *bid = bpf_map_lookup_elem(&podnet_svc_slots, &sk);

	if (!bid)
		return 0;
	*backend_id = *bid;
	return bpf_map_lookup_elem(&podnet_svc_backends, bid);
}

/* least connection: the first slot with the fewest open flows among the first LC_SCAN_MAX */
static __always_inline __u32 least_connection_slot(struct frontend *fe)
{
	__u32 best = 0;
	__s64 best_n = 0x7fffffffffffffffLL;

	for (__u32 i = 0; i < LC_SCAN_MAX; i++) {
		struct slot_key sk = { .id = fe->id, .slot = i };
		__u32 *bid;
		__s64 *n;

		if (i >= fe->count)
			break;
		bid = bpf_map_lookup_elem(&podnet_svc_slots, &sk);
		if (!bid)
			continue;
		n = bpf_map_lookup_elem(&podnet_svc_conns, bid);
		if (n && *n < best_n) {
			best_n = *n;
			best = i;
		} else if (!n && best_n > 0) {
			best_n = 0;
			best = i;
		}
	}
	return best;
}

static __always_inline __u32 hash_u32(__u32 x)
{
	/* a 32-bit integer mix (murmur3's finaliser) */
	x ^= x >> 16;
	x *= 0x85ebca6b;
	x ^= x >> 13;
	x *= 0xc2b2ae35;
	x ^= x >> 16;
	return x;
}

static __always_inline void count_open(__u32 backend_id, __s64 delta)
{
	__s64 *n = bpf_map_lookup_elem(&podnet_svc_conns, &backend_id);

	if (n)
		__sync_fetch_and_add(n, delta);
}

/* A FIN or RST ends a counted flow once (the fwd entry carries the flag). */
static __always_inline void note_close(struct podnet_pkt *pkt, struct ct_key *fwd_key)
{
	struct ct_entry *fwd;

	if (pkt->proto != IPPROTO_TCP || !(pkt->tcp_flags & (PODNET_TCP_FIN | PODNET_TCP_RST)))
		return;
	fwd = bpf_map_lookup_elem(&podnet_svc_ct, fwd_key);
	if (!fwd || (fwd->flags & CT_F_CLOSED))
		return;
	fwd->flags |= CT_F_CLOSED;
	count_open(fwd->backend_id, -1);
}

/* A TCP or UDP packet the programs balance (the first fragment: ports are there), and its
 * flow key in one direction; 0 for anything else (passed on untouched). */
static __always_inline int flow_of(struct __sk_buff *skb, struct podnet_pkt *pkt, __u8 dir, struct ct_key *key)
{
	if (podnet_parse(skb, pkt) < 0 || !pkt->first_frag)
		return 0;
	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return 0;
	key->src = pkt->saddr;
	key->dst = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
	key->dir = dir;
	return 1;
}

SEC("tc")
int podnet_svc_from_pod(struct __sk_buff *skb)
{
	struct podnet_pkt pkt;
	struct ct_key key = {};
	struct ct_entry *ct, entry = {};
	struct frontend_key fk = {};
	struct frontend *fe;
	struct backend *be = 0;
	__u32 backend_id = 0, slot;

	if (!flow_of(skb, &pkt, CT_DIR_FWD, &key))
		return TC_ACT_UNSPEC;
	ct = bpf_map_lookup_elem(&podnet_svc_ct, &key);
	if (ct) {
		/* the flow's backend, while it is still one (a removed backend's id is gone) */
		be = bpf_map_lookup_elem(&podnet_svc_backends, &ct->backend_id);
		int new_syn = pkt.proto == IPPROTO_TCP && (pkt.tcp_flags & PODNET_TCP_SYN) &&
			      !(pkt.tcp_flags & PODNET_TCP_ACK) && (ct->flags & CT_F_CLOSED);
		if (be && be->addr == ct->addr && be->port == ct->port && !new_syn) {
			note_close(&pkt, &key);
			if (podnet_rewrite(skb, &pkt, 1, ct->addr, ct->port) < 0)
				return TC_ACT_SHOT;
			return TC_ACT_UNSPEC;
		}
		if (!(ct->flags & CT_F_CLOSED))
			count_open(ct->backend_id, -1);
		bpf_map_delete_elem(&podnet_svc_ct, &key);
		be = 0;
	}

	fk.addr = pkt.daddr;
	fk.port = pkt.dport;
	fk.proto = pkt.proto;
	fe = bpf_map_lookup_elem(&podnet_svc_frontends, &fk);
	if (!fe && bpf_map_lookup_elem(&podnet_svc_node_ips, &pkt.daddr)) {
		fk.addr = 0;  /* a NodePort: on every address of the node */
		fe = bpf_map_lookup_elem(&podnet_svc_frontends, &fk);
	}
	if (!fe) {
		struct cidr_key ck = { .prefixlen = 32, .addr = pkt.daddr };

		if (bpf_map_lookup_elem(&podnet_svc_cluster_ips, &pkt.daddr))
			return reject(skb);
		if (bpf_map_lookup_elem(&podnet_svc_cidrs, &ck))
			return TC_ACT_SHOT;
		return TC_ACT_UNSPEC;
	}
	{
		__u32 ifindex = skb->ifindex;
		__u8 *role = bpf_map_lookup_elem(&podnet_svc_ifaces, &ifindex);

		if (role && *role == IF_ROLE_UNDERLAY) {
			struct frontend *ext = bpf_map_lookup_elem(&podnet_svc_external, &fk);

			if (ext)
				fe = ext;
		}
	}
	if (fe->flags & SVC_F_SRC_RANGES) {
		struct src_range_key sk = { .prefixlen = 64, .id = fe->id, .addr = pkt.saddr };

		if (!bpf_map_lookup_elem(&podnet_svc_src_ranges, &sk))
			return TC_ACT_SHOT;  /* as kube-proxy: a source outside the ranges is dropped */
	}
	if (fe->count == 0)
		return (fe->flags & SVC_F_NO_EP_DROP) ? TC_ACT_SHOT : reject(skb);

	if (fe->flags & SVC_F_AFFINITY) {
		struct affinity_key ak = { .client = pkt.saddr, .affinity_key = fe->affinity_key };
		struct affinity *af = bpf_map_lookup_elem(&podnet_svc_affinity, &ak);

		if (af && bpf_ktime_get_ns() - af->seen_ns < (__u64)fe->affinity_timeout * 1000000000ULL) {
			backend_id = af->backend_id;
			be = bpf_map_lookup_elem(&podnet_svc_backends, &backend_id);
		}
	}
	if (!be) {
		__u32 sched = (fe->flags >> SVC_SCHED_SHIFT) & 0xf;

		if (sched == SVC_SCHED_LC)
			slot = least_connection_slot(fe);
		else if (sched == SVC_SCHED_SH)
			slot = hash_u32(pkt.saddr) % fe->count;
		else
			slot = bpf_get_prandom_u32() % fe->count;
		be = backend_of_slot(fe->id, slot, &backend_id);
		if (!be)
			return reject(skb);  /* slots being rewritten: the client retries */
	}
	if (fe->flags & SVC_F_AFFINITY) {
		struct affinity_key ak = { .client = pkt.saddr, .affinity_key = fe->affinity_key };
		struct affinity af = { .seen_ns = bpf_ktime_get_ns(), .backend_id = backend_id };

		bpf_map_update_elem(&podnet_svc_affinity, &ak, &af, BPF_ANY);
	}

	entry.addr = be->addr;
	entry.port = be->port;
	entry.backend_id = backend_id;
	entry.svc_id = fe->id;
	entry.flags = pkt.proto == IPPROTO_TCP ? 0 : CT_F_CLOSED;  /* only TCP flows are counted */
	bpf_map_update_elem(&podnet_svc_ct, &key, &entry, BPF_ANY);
	if (pkt.proto == IPPROTO_TCP)
		count_open(backend_id, 1);
	{
		struct ct_key rkey = {
			.src = be->addr, .dst = pkt.saddr, .sport = be->port, .dport = pkt.sport,
			.proto = pkt.proto, .dir = CT_DIR_REV,
		};
		struct ct_entry rev = {
			.addr = pkt.daddr, .port = pkt.dport, .backend_id = backend_id, .svc_id = fe->id,
		};

		bpf_map_update_elem(&podnet_svc_ct, &rkey, &rev, BPF_ANY);
	}
	/* hairpin: a pod that reaches itself must see the node as the client, or its reply
	 * would go straight back to itself, unknown to the connection it made */
	if ((fe->flags & SVC_F_MASQ) || entry.addr == pkt.saddr)
		skb->mark |= SVC_MASQ_MARK;
	if (podnet_rewrite(skb, &pkt, 1, entry.addr, entry.port) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

SEC("tc")
int podnet_svc_to_pod(struct __sk_buff *skb)
{
	struct podnet_pkt pkt;
	struct ct_key key = {};
	struct ct_entry *ct;

	if (!flow_of(skb, &pkt, CT_DIR_REV, &key))
		return TC_ACT_UNSPEC;
	ct = bpf_map_lookup_elem(&podnet_svc_ct, &key);
	if (!ct)
		return TC_ACT_UNSPEC;
	{
		struct ct_key fwd = {
			.src = pkt.daddr, .dst = ct->addr, .sport = pkt.dport, .dport = ct->port,
			.proto = pkt.proto, .dir = CT_DIR_FWD,
		};
		note_close(&pkt, &fwd);
	}
	if (podnet_rewrite(skb, &pkt, 0, ct->addr, ct->port) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
