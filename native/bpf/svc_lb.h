/* A Service's frontends, backends and how a new flow chooses one: shared by the tc
 * programs (services.c: the node's pods and clients from the underlay) and the cgroup
 * socket programs (sock.c: the node's own processes), so both balance over the same
 * maps (libbpf pins them by name: the two objects share one copy per agent) with the
 * same schedulers and affinity.
 *
 * The agent writes the maps (src/podnet/services/ebpf/maps.py mirrors every struct);
 * addresses and ports in network byte order, the rest in host order.
 */
#ifndef PODNET_SVC_LB_H
#define PODNET_SVC_LB_H

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
	__uint(max_entries, 262144);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_affinity SEC(".maps");

static __always_inline struct backend *backend_of_slot(__u32 id, __u32 slot, __u32 *backend_id)
{
	struct slot_key sk = { .id = id, .slot = slot };
	__u32 *bid = bpf_map_lookup_elem(&podnet_svc_slots, &sk);

	if (!bid)
		return 0;
	*backend_id = *bid;
	return bpf_map_lookup_elem(&podnet_svc_backends, bid);
}

/* least connection: the first slot with the fewest open flows, over every slot (bpf_loop:
 * a frontend may have thousands; an unrolled or bounded loop would look at the first few) */
struct lc_scan {
	__u32 id;
	__u32 best;
	__s64 best_n;
};

static long lc_visit(__u32 slot, void *ctx)
{
	struct lc_scan *s = ctx;
	struct slot_key sk = { .id = s->id, .slot = slot };
	__u32 *bid = bpf_map_lookup_elem(&podnet_svc_slots, &sk);
	__s64 *n, open;

	if (!bid)
		return 0;
	n = bpf_map_lookup_elem(&podnet_svc_conns, bid);
	open = n ? *n : 0;
	if (open < s->best_n) {
		s->best_n = open;
		s->best = slot;
	}
	return 0;
}

static __always_inline __u32 least_connection_slot(struct frontend *fe)
{
	struct lc_scan s = { .id = fe->id, .best = 0, .best_n = 0x7fffffffffffffffLL };

	bpf_loop(fe->count, lc_visit, &s, 0);
	return s.best;
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

/* The frontend of (address, port, protocol): the address's own, else a NodePort's (address
 * 0) when the address is one of the node's; fk->addr is 0 then. */
static __always_inline struct frontend *svc_frontend(struct frontend_key *fk)
{
	struct frontend *fe = bpf_map_lookup_elem(&podnet_svc_frontends, fk);

	if (!fe && bpf_map_lookup_elem(&podnet_svc_node_ips, &fk->addr)) {
		fk->addr = 0;  /* a NodePort: on every address of the node */
		fe = bpf_map_lookup_elem(&podnet_svc_frontends, fk);
	}
	return fe;
}

#define SVC_MISS_PASS   0        /* not a Service address: none of ours */
#define SVC_MISS_REJECT 1        /* an allocated ClusterIP, a port it does not have */
#define SVC_MISS_DROP   2        /* an address of the Service CIDRs no Service has */

/* What an address without a frontend for its port is (SVC_MISS_*). */
static __always_inline int svc_miss(__u32 addr)
{
	struct cidr_key ck = { .prefixlen = 32, .addr = addr };

	if (bpf_map_lookup_elem(&podnet_svc_cluster_ips, &addr))
		return SVC_MISS_REJECT;
	if (bpf_map_lookup_elem(&podnet_svc_cidrs, &ck))
		return SVC_MISS_DROP;
	return SVC_MISS_PASS;
}

/* The backend of a new flow from client to fe (fe->count > 0): the client's affinity entry
 * while fresh, else the frontend's scheduler; the affinity entry is (re)written. NULL if
 * the slot is missing (slots being rewritten: the client retries). */
static __always_inline struct backend *svc_choose(struct frontend *fe, __u32 client, __u32 *backend_id)
{
	struct affinity_key ak = { .client = client, .affinity_key = fe->affinity_key };
	struct backend *be = 0;
	__u32 slot;

	if (fe->flags & SVC_F_AFFINITY) {
		struct affinity *af = bpf_map_lookup_elem(&podnet_svc_affinity, &ak);

		if (af && bpf_ktime_get_ns() - af->seen_ns < (__u64)fe->affinity_timeout * 1000000000ULL) {
			*backend_id = af->backend_id;
			be = bpf_map_lookup_elem(&podnet_svc_backends, backend_id);
		}
	}
	if (!be) {
		__u32 sched = (fe->flags >> SVC_SCHED_SHIFT) & 0xf;

		if (sched == SVC_SCHED_LC)
			slot = least_connection_slot(fe);
		else if (sched == SVC_SCHED_SH)
			slot = hash_u32(client) % fe->count;
		else
			slot = bpf_get_prandom_u32() % fe->count;
		be = backend_of_slot(fe->id, slot, backend_id);
		if (!be)
			return 0;
	}
	if (fe->flags & SVC_F_AFFINITY) {
		struct affinity af = { .seen_ns = bpf_ktime_get_ns(), .backend_id = *backend_id };

		bpf_map_update_elem(&podnet_svc_affinity, &ak, &af, BPF_ANY);
	}
	return be;
}

#endif
