/* podnet's Service load balancer on tc (`podnet agent --service-proxy ebpf`).
 *
 * podnet_svc_from_pod (ingress of a pod's host-side veth, prio 1): a packet to a Service
 * frontend (ClusterIP, externalIP, LoadBalancer IP: address, protocol, port) gets a
 * backend's address and port before the node routes it; the choice is kept in the
 * connection map `ct` so every later packet of the flow goes to the same backend.
 * podnet_svc_to_pod (egress, prio 2): a reply of such a flow gets the frontend's address and
 * port back (reverse NAT) before the pod sees it; a fast-path flow's forward packet passes
 * it at once (SVC_FAST_FWD_MARK).
 * podnet_svc_redirect (ingress, prio 4, after policy and its guard): the fast path. A flow
 * between two pods of this node that needs nothing of the node's netfilter (no masquerade)
 * is sent straight to the other pod's host-side veth (its egress: policy's to-pod program,
 * the reverse NAT and the guard still run there), skipping the node's routing, netfilter
 * hooks and conntrack. Only while the agent has switched it on (podnet_svc_config): it is
 * safe only where no nftables NetworkPolicy would have judged the packet (docs/ebpf.md).
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
#define CT_F_FAST   0x2          /* both ends are local pods, no masquerade: the fast path's */

/* podnet_svc_from_pod marks a packet for the fast path; podnet_svc_redirect, last at the
 * hook, takes the mark off and redirects. A packet policy drops never gets there; one that
 * keeps the mark (the redirect filter missing) just takes the node's path. */
#define SVC_FAST_MARK    0x00800000

/* A forward packet of a fast-path flow (client to backend) also carries this from
 * podnet_svc_from_pod to the backend's veth egress: podnet_svc_to_pod has nothing to
 * undo on it (the reverse NAT is for the backend's replies) and returns at once, without
 * parsing the packet or looking up the connection map. podnet_svc_redirect takes it off
 * a packet it does not redirect, so it only ever reaches the veth the redirect chose. */
#define SVC_FAST_FWD_MARK 0x01000000

/* podnet_svc_config's one entry: CFG_FAST_PATH switches the fast path on (default off) */
#define CFG_FAST_PATH    0x1

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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_config SEC(".maps");

/* this node's pods: address -> the ifindex of its host-side veth (the agent's, from the routes) */
struct local_pod {
	__u32 ifindex;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct local_pod);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_svc_local SEC(".maps");

static __always_inline int fast_path_on(void)
{
	__u32 zero = 0;
	__u32 *cfg = bpf_map_lookup_elem(&podnet_svc_config, &zero);

	return cfg && (*cfg & CFG_FAST_PATH);
}

/* A new flow may take the fast path: switched on, no masquerade, the client a pod of this
 * node that sent from its own veth (not a spoofed address), the backend a pod of this node. */
static __always_inline int fast_eligible(struct __sk_buff *skb, __u32 client, __u32 backend, int masq)
{
	struct local_pod *lp;

	if (masq || !fast_path_on())
		return 0;
	lp = bpf_map_lookup_elem(&podnet_svc_local, &client);
	if (!lp || lp->ifindex != skb->ifindex)
		return 0;
	return bpf_map_lookup_elem(&podnet_svc_local, &backend) != 0;
}

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
	int masq, fast;

	if (!flow_of(skb, &pkt, CT_DIR_FWD, &key))
		return TC_ACT_UNSPEC;
	ct = bpf_map_lookup_elem(&podnet_svc_ct, &key);
	if (ct) {
		/* the flow's backend, while it is still one (a removed backend's id is gone) */
		be = bpf_map_lookup_elem(&podnet_svc_backends, &ct->backend_id);
		int new_syn = pkt.proto == IPPROTO_TCP && (pkt.tcp_flags & PODNET_TCP_SYN) &&
			      !(pkt.tcp_flags & PODNET_TCP_ACK) && (ct->flags & CT_F_CLOSED);
		if (be && be->addr == ct->addr && be->port == ct->port && !new_syn) {
			int keep_fast = (ct->flags & CT_F_FAST) && fast_path_on();

			note_close(&pkt, &key);
			if (rewrite(skb, &pkt, 1, ct->addr, ct->port) < 0)
				return TC_ACT_SHOT;
			if (keep_fast)
				skb->mark |= SVC_FAST_MARK | SVC_FAST_FWD_MARK;
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
		if (miss == SVC_MISS_DROP)
			return TC_ACT_SHOT;
		/* a backend's reply to a fast-path flow: straight to the client's veth too
		 * (its reverse NAT runs at that veth's egress, as on the node's path) */
		if (fast_path_on()) {
			key.dir = CT_DIR_REV;
			ct = bpf_map_lookup_elem(&podnet_svc_ct, &key);
			if (ct && (ct->flags & CT_F_FAST))
				skb->mark |= SVC_FAST_MARK;
		}
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

	be = svc_choose(fe, pkt.saddr, &backend_id);
	if (!be)
		return reject(skb);  /* slots being rewritten: the client retries */

	entry.addr = be->addr;
	entry.port = be->port;
	entry.backend_id = backend_id;
	entry.svc_id = fe->id;
	entry.flags = pkt.proto == IPPROTO_TCP ? 0 : CT_F_CLOSED;  /* only TCP flows are counted */
	/* hairpin: a pod that reaches itself must see the node as the client, or its reply
	 * would go straight back to itself, unknown to the connection it made */
	masq = (fe->flags & SVC_F_MASQ) || entry.addr == pkt.saddr;
	fast = fast_eligible(skb, pkt.saddr, entry.addr, masq);
	if (fast)
		entry.flags |= CT_F_FAST;
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
			.flags = fast ? CT_F_FAST : 0,
		};

		bpf_map_update_elem(&podnet_svc_ct, &rkey, &rev, BPF_ANY);
	}
	if (masq)
		skb->mark |= SVC_MASQ_MARK;
	if (rewrite(skb, &pkt, 1, entry.addr, entry.port) < 0)
		return TC_ACT_SHOT;
	if (fast)
		skb->mark |= SVC_FAST_MARK | SVC_FAST_FWD_MARK;
	return TC_ACT_UNSPEC;
}

SEC("tc")
int podnet_svc_to_pod(struct __sk_buff *skb)
{
	struct podnet_pkt pkt;
	struct ct_key key = {};
	struct ct_entry *ct;

	if (skb->mark & SVC_FAST_FWD_MARK) {  /* a fast-path flow's forward packet: nothing to undo */
		skb->mark &= ~SVC_FAST_FWD_MARK;
		return TC_ACT_UNSPEC;
	}
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

/* The fast path's last step (see the top): a packet podnet_svc_from_pod marked, which
 * policy and its guard (prio 2 and 3) let through, goes to the destination pod's host-side
 * veth as the node's routing would send it: TTL less one, Ethernet addresses from the
 * kernel's neighbour entry of that veth (bpf_redirect_neigh with the pod as next hop: the
 * same entry routing uses, no route lookup), out of that veth's egress hook. */
SEC("tc")
int podnet_svc_redirect(struct __sk_buff *skb)
{
	struct bpf_redir_neigh nh = { .nh_family = 2 /* AF_INET */ };
	struct local_pod *lp;
	struct iphdr *ip;
	__u16 old, new;
	__u8 ttl;

	if (!(skb->mark & SVC_FAST_MARK))
		return TC_ACT_UNSPEC;
	skb->mark &= ~SVC_FAST_MARK;
	/* the header read in place (outside the skb's linear part, rare for a pod's packets:
	 * the node's path), written through the helpers, which keep the checksum state */
	ip = (void *)(long)skb->data + PODNET_L3_OFF;
	if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(ip + 1) > (void *)(long)skb->data_end)
		goto node_path;
	nh.ipv4_nh = ip->daddr;
	ttl = ip->ttl;
	/* the TTL shares a 16-bit word with the protocol: the checksum is updated over both */
	old = *(__u16 *)&ip->ttl;
	lp = bpf_map_lookup_elem(&podnet_svc_local, &nh.ipv4_nh);
	if (!lp || ttl <= 1)
		goto node_path;  /* gone meanwhile, or TTL out: the node's path (and its ICMP) */
	ttl--;
	new = bpf_htons(bpf_ntohs(old) - 0x100);  /* the same word with the TTL less one */
	if (bpf_l3_csum_replace(skb, PODNET_IP_CSUM_OFF, old, new, sizeof(new)) < 0 ||
	    bpf_skb_store_bytes(skb, PODNET_L3_OFF + offsetof(struct iphdr, ttl), &ttl, 1, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(lp->ifindex, &nh, sizeof(nh), 0);
node_path:
	/* routed, the packet may leave by another veth than the one podnet_svc_from_pod
	 * found: its reverse NAT must look at it there */
	skb->mark &= ~SVC_FAST_FWD_MARK;
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
