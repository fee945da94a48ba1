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
#include "svc_lb.h"
#include "sctp_crc.h"

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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_ct SEC(".maps");

static __always_inline int reject(struct __sk_buff *skb)
{
	skb->mark |= SVC_REJECT_MARK;
	return TC_ACT_UNSPEC;
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

/* A TCP, UDP or SCTP packet the programs balance (the first fragment: ports are there),
 * and its flow key in one direction; 0 for anything else (passed on untouched). */
static __always_inline int flow_of(struct __sk_buff *skb, struct podnet_pkt *pkt, __u8 dir, struct ct_key *key)
{
	if (podnet_parse(skb, pkt) < 0 || !pkt->first_frag)
		return 0;
	if (pkt->proto == IPPROTO_SCTP) {  /* (podnet_parse reads TCP's and UDP's ports only) */
		__u16 ports[2];

		if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
			return 0;
		pkt->sport = ports[0];
		pkt->dport = ports[1];
	} else if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP) {
		return 0;
	}
	key->src = pkt->saddr;
	key->dst = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
	key->dir = dir;
	return 1;
}

/* podnet_rewrite, and SCTP's checksum computed again when a port changed (sctp_crc.h) */
static __always_inline int rewrite(struct __sk_buff *skb, struct podnet_pkt *pkt, int which, __u32 addr, __u16 port)
{
	__u16 old_port = which ? pkt->dport : pkt->sport;

	if (podnet_rewrite(skb, pkt, which, addr, port) < 0)
		return -1;
	if (pkt->proto == IPPROTO_SCTP && port && port != old_port)
		return sctp_crc_fix(skb, pkt->l4_off);
	return 0;
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
	__u32 backend_id = 0;

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
			if (rewrite(skb, &pkt, 1, ct->addr, ct->port) < 0)
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
	fe = svc_frontend(&fk);
	if (!fe) {
		int miss = svc_miss(pkt.daddr);

		if (miss == SVC_MISS_REJECT)
			return reject(skb);
		return miss == SVC_MISS_DROP ? TC_ACT_SHOT : TC_ACT_UNSPEC;
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

	be = svc_choose(fe, pkt.saddr, &backend_id);
	if (!be)
		return reject(skb);  /* slots being rewritten: the client retries */

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
	if (rewrite(skb, &pkt, 1, entry.addr, entry.port) < 0)
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
	if (rewrite(skb, &pkt, 0, ct->addr, ct->port) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
