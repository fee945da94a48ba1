/* What podnet's tc programs share: packet parsing, checksum-safe rewrites and the
 * constants of the hook layout (src/podnet/ebpf/attach.py defines the layout, this
 * header the verdicts the programs return).
 *
 * Every program is attached with tc clsact direct-action on a pod's host-side veth:
 *   ingress (packets from the pod):  services prio 1, then policy prio 2
 *   egress  (packets to the pod):    policy prio 1, then services (reverse NAT) prio 2
 * A program returns TC_ACT_UNSPEC to let the next filter (and then the stack) have the
 * packet, TC_ACT_SHOT to drop it.
 *
 * Packets are read in place where the headers are in the skb's linear part (podnet_parse),
 * else with bpf_skb_load_bytes(), which works on non-linear skbs; they are written with the
 * helpers (bpf_skb_store_bytes, the checksum ones), which keep the skb's checksum state.
 */
#ifndef PODNET_BPF_H
#define PODNET_BPF_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef TC_ACT_UNSPEC
#define TC_ACT_UNSPEC (-1)
#endif

#define PODNET_L3_OFF ETH_HLEN
#define PODNET_IP_CSUM_OFF (PODNET_L3_OFF + offsetof(struct iphdr, check))
#define PODNET_IP_SRC_OFF (PODNET_L3_OFF + offsetof(struct iphdr, saddr))
#define PODNET_IP_DST_OFF (PODNET_L3_OFF + offsetof(struct iphdr, daddr))

/* TCP flags as the byte at offset 13 of the TCP header holds them */
#define PODNET_TCP_FIN 0x01
#define PODNET_TCP_SYN 0x02
#define PODNET_TCP_RST 0x04
#define PODNET_TCP_ACK 0x10

/* One IPv4 packet's addresses, ports and where its headers are. Addresses and ports
 * stay in network byte order, as maps keyed by them hold them. */
struct podnet_pkt {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;        /* 0 unless TCP or UDP */
	__u16 dport;
	__u8 proto;         /* IPPROTO_* */
	__u8 tcp_flags;     /* TCP only */
	__u8 first_frag;    /* 1: ports are present (not a later fragment) */
	__u8 pad;
	__u32 l4_off;       /* offset of the L4 header from the start of the frame */
};

/* podnet_parse's way for headers outside the skb's linear part: copied out with
 * bpf_skb_load_bytes(), which works on non-linear skbs. */
static __always_inline int podnet_parse_copy(struct __sk_buff *skb, struct podnet_pkt *pkt)
{
	struct iphdr ip;
	__u16 ports[2];
	__u16 frag;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, PODNET_L3_OFF, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	pkt->saddr = ip.saddr;
	pkt->daddr = ip.daddr;
	pkt->proto = ip.protocol;
	pkt->l4_off = PODNET_L3_OFF + ip.ihl * 4;
	pkt->sport = pkt->dport = 0;
	pkt->tcp_flags = 0;
	pkt->pad = 0;
	frag = bpf_ntohs(ip.frag_off);
	pkt->first_frag = (frag & 0x1fff) == 0;
	if (!pkt->first_frag)
		return 0;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
			return -1;
		pkt->sport = ports[0];
		pkt->dport = ports[1];
		if (ip.protocol == IPPROTO_TCP &&
		    bpf_skb_load_bytes(skb, pkt->l4_off + 13, &pkt->tcp_flags, 1) < 0)
			return -1;
	}
	return 0;
}

/* Parses an Ethernet + IPv4 frame into pkt: 0 on success, -1 for anything else (not
 * IPv4, truncated); programs let such packets pass. The headers are read in place when
 * they are in the skb's linear part (every packet a pod's socket sends: one bounds check
 * instead of a helper call per header, a few tens of ns per packet and program); else
 * through podnet_parse_copy. */
static __always_inline int podnet_parse(struct __sk_buff *skb, struct podnet_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + PODNET_L3_OFF;
	__u8 *l4;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if ((void *)(ip + 1) > end)
		return podnet_parse_copy(skb, pkt);
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->proto = ip->protocol;
	pkt->l4_off = PODNET_L3_OFF + ip->ihl * 4;
	pkt->sport = pkt->dport = 0;
	pkt->tcp_flags = 0;
	pkt->pad = 0;
	pkt->first_frag = (bpf_ntohs(ip->frag_off) & 0x1fff) == 0;
	if (!pkt->first_frag || (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP))
		return 0;
	l4 = data + pkt->l4_off;
	/* the ports; TCP's flags are byte 13 */
	if (l4 + (pkt->proto == IPPROTO_TCP ? 14 : 4) > (__u8 *)end)
		return podnet_parse_copy(skb, pkt);
	__builtin_memcpy(&pkt->sport, l4, 2);
	__builtin_memcpy(&pkt->dport, l4 + 2, 2);
	if (pkt->proto == IPPROTO_TCP)
		pkt->tcp_flags = l4[13];
	return 0;
}

/* Offset of the L4 checksum within its header, or -1 if the protocol has none we keep */
static __always_inline int podnet_l4_csum_off(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return offsetof(struct tcphdr, check);
	if (proto == IPPROTO_UDP)
		return offsetof(struct udphdr, check);
	return -1;
}

/* Rewrites one address (source: which = 0, destination: which = 1) and, when port is
 * not 0, the port at the same side, keeping the IP and L4 checksums right. A UDP
 * checksum of 0 (none) stays 0 (BPF_F_MARK_MANGLED_0). 0 on success. */
static __always_inline int podnet_rewrite(struct __sk_buff *skb, struct podnet_pkt *pkt, int which,
					  __u32 new_addr, __u16 new_port)
{
	__u32 old_addr = which ? pkt->daddr : pkt->saddr;
	__u16 old_port = which ? pkt->dport : pkt->sport;
	int addr_off = which ? PODNET_IP_DST_OFF : PODNET_IP_SRC_OFF;
	int port_off = pkt->l4_off + (which ? 2 : 0);
	int csum = podnet_l4_csum_off(pkt->proto);
	__u64 mangled = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (csum >= 0 && pkt->first_frag) {
		if (bpf_l4_csum_replace(skb, pkt->l4_off + csum, old_addr, new_addr,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) < 0)
			return -1;
		if (new_port && new_port != old_port &&
		    bpf_l4_csum_replace(skb, pkt->l4_off + csum, old_port, new_port,
					mangled | sizeof(new_port)) < 0)
			return -1;
	}
	if (bpf_l3_csum_replace(skb, PODNET_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return -1;
	if (new_port && new_port != old_port && pkt->first_frag &&
	    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
		return -1;
	if (which) {
		pkt->daddr = new_addr;
		if (new_port)
			pkt->dport = new_port;
	} else {
		pkt->saddr = new_addr;
		if (new_port)
			pkt->sport = new_port;
	}
	return 0;
}

#endif
