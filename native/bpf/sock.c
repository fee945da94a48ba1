/* Services for the node's own processes: socket-level load balancing on the cgroup2 root
 * (as Cilium's bpf_sock.c), next to the tc programs of services.c that see pods' packets.
 *
 * A packet a host process sends to a ClusterIP is routed before any tc hook sees it, so
 * the destination is chosen where the socket names it:
 *   podnet_sock_connect4 (connect(2): TCP, connected UDP) and podnet_sock_sendmsg4
 *   (sendto(2) on an unconnected UDP socket) replace a frontend's address and port with a
 *   backend's, chosen by the same frontends, slots, schedulers and affinity as the tc
 *   programs (svc_lb.h); the socket then talks to the backend itself, no packet is
 *   rewritten, no flow entry is needed.
 *   podnet_sock_recvmsg4 (recvfrom(2)) and podnet_sock_getpeername4 put the frontend back
 *   where the application reads the peer: it sees the Service's address, as with DNAT.
 *
 * The programs are attached to the cgroup2 root (every process of the machine), so they
 * act only for sockets of the agent's own network namespace: its cookie is in
 * podnet_sock_netns (written by the agent; 0: act for none). Pods' sockets (the tc
 * programs handle their packets) and every other namespace of the machine pass untouched.
 *
 * A verdict of 1 lets the call go on; 0 fails it, with the errno bpf_set_retval() gave.
 */
#include <linux/errno.h>
#include "svc_lb.h"

#define SOL_SOCKET 1
#define SO_MARK 36
/* Sockets to an address of the Service CIDRs that no Service has carry this mark: the
 * agent's nftables table drops their packets in output, as the nftables backend does (a
 * TCP connect times out, a UDP send fails with EPERM). */
#define SOCK_DROP_MARK 0x00800000  /* not policy's POL_PASSED_MARK (0x00400000) */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_sock_netns SEC(".maps");

/* What a socket was sent to instead of a frontend: (socket cookie, backend) -> frontend */
struct rev_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct rev_entry {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct rev_key);
	__type(value, struct rev_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podnet_sock_rev SEC(".maps");

/* The socket belongs to the agent's network namespace. */
static __always_inline int ours(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	__u64 *cookie = bpf_map_lookup_elem(&podnet_sock_netns, &zero);

	return cookie && *cookie && *cookie == bpf_get_netns_cookie(ctx);
}

static __always_inline int refuse(int err)
{
	bpf_set_retval(-err);
	return 0;
}

/* An address of the Service CIDRs without a Service. connect: the socket is marked (its
 * packets are dropped in output, as the nftables backend's); sendmsg: EPERM, what a UDP
 * send gets from that drop. */
static __always_inline int unused_address(struct bpf_sock_addr *ctx, int connecting)
{
	int mark = SOCK_DROP_MARK;

	if (!connecting)
		return refuse(EPERM);
	bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
	return 1;
}

/* The frontend the socket names, if any, replaced with one of its backends. */
static __always_inline int balance(struct bpf_sock_addr *ctx, int connecting)
{
	struct frontend_key fk = {};
	struct frontend *fe;
	struct backend *be;
	__u32 frontend_addr = ctx->user_ip4, backend_id = 0;
	__u16 frontend_port = (__u16)ctx->user_port;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	if (!ours(ctx))
		return 1;
	fk.addr = frontend_addr;
	fk.port = frontend_port;
	fk.proto = ctx->protocol;
	fe = svc_frontend(&fk);
	if (!fe) {
		int miss = svc_miss(frontend_addr);

		if (miss == SVC_MISS_REJECT)
			return refuse(ECONNREFUSED);
		return miss == SVC_MISS_DROP ? unused_address(ctx, connecting) : 1;
	}
	if (fe->count == 0)
		return (fe->flags & SVC_F_NO_EP_DROP) ? unused_address(ctx, connecting) : refuse(ECONNREFUSED);
	/* The client is the node (0: its processes have no address yet at connect): they
	 * share an affinity entry and a source hash, as they share the node's address. The
	 * node is not held to loadBalancerSourceRanges, and its flows are not counted for
	 * least connection (no packet of theirs meets the tc programs that count). */
	be = svc_choose(fe, 0, &backend_id);
	if (!be)
		return refuse(ECONNREFUSED);
	{
		struct rev_key rk = {
			.cookie = bpf_get_socket_cookie(ctx), .addr = be->addr, .port = be->port,
			.proto = fk.proto,
		};
		struct rev_entry rev = { .addr = frontend_addr, .port = frontend_port };

		bpf_map_update_elem(&podnet_sock_rev, &rk, &rev, BPF_ANY);
	}
	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;
	return 1;
}

/* A backend the socket reads as its peer shows as the frontend it asked for. */
static __always_inline void unbalance(struct bpf_sock_addr *ctx)
{
	struct rev_key rk = {};
	struct rev_entry *rev;

	if (!ours(ctx))
		return;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__u16)ctx->user_port;
	rk.proto = ctx->protocol;
	rev = bpf_map_lookup_elem(&podnet_sock_rev, &rk);
	if (rev) {
		ctx->user_ip4 = rev->addr;
		ctx->user_port = rev->port;
	}
}

SEC("cgroup/connect4")
int podnet_sock_connect4(struct bpf_sock_addr *ctx)
{
	return balance(ctx, 1);
}

SEC("cgroup/sendmsg4")
int podnet_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return balance(ctx, 0);
}

SEC("cgroup/recvmsg4")
int podnet_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	unbalance(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int podnet_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	unbalance(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
