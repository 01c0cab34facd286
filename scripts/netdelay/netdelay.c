/*
 * netdelay: hold every packet of one NFQUEUE queue for a fixed delay, then
 * accept it, in arrival order. This kernel has no netem; an iptables rule
 * `-j NFQUEUE --queue-num Q --queue-bypass` in a host's PREROUTING plus this
 * program adds DELAY ms to every packet entering that host. Driven by
 * scripts/netdelay.sh (which adds and removes the rule); see there.
 *
 *   netdelay -q QUEUE -d DELAY_MS [-m MAXLEN] [-b RCVBUF] [-r READY_FILE]
 *
 * How: the queue copies metadata only (NFQNL_COPY_META, whole GSO packets),
 * so each queued packet costs a small netlink message. Every packet id goes
 * into a FIFO ring with its due time (arrival + delay); since the delay is
 * constant, the ring is sorted by due time. Whenever the head is due, one
 * batch verdict (NF_ACCEPT for every id up to the last due one) releases
 * all due packets at once, in order. A netlink message lost to a full
 * socket buffer (ENOBUFS) does not strand its packet: the next batch
 * verdict covers every lower id still in the kernel's queue.
 *
 * Failure: the kernel queue fails open (a full queue accepts instead of
 * dropping), and with --queue-bypass on the rule a dead program lets
 * traffic through undelayed. On SIGTERM/SIGINT/SIGHUP it releases every
 * held packet at once and exits 0, printing its counters on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libnetfilter_queue/libnetfilter_queue.h>

struct held {
	uint32_t id;
	uint64_t due_ns;
};

static struct held *ring;
static size_t ring_cap, ring_head, ring_len;
static uint64_t delay_ns, arrival_ns;
static struct nfq_q_handle *qh;
static volatile sig_atomic_t stop;

static uint64_t n_packets, n_batches, n_enobufs, n_early, max_held;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "netdelay: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Accepts every held packet up to and including ring index `count - 1`. */
static void release(size_t count)
{
	if (count == 0)
		return;
	size_t last = (ring_head + count - 1) % ring_cap;
	if (nfq_set_verdict_batch(qh, ring[last].id, NF_ACCEPT) < 0)
		fprintf(stderr, "netdelay: batch verdict failed: %s\n", strerror(errno));
	ring_head = (ring_head + count) % ring_cap;
	ring_len -= count;
	n_batches++;
}

static void release_due(uint64_t now)
{
	size_t count = 0;
	while (count < ring_len && ring[(ring_head + count) % ring_cap].due_ns <= now)
		count++;
	release(count);
}

static int on_packet(struct nfq_q_handle *q, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
	(void)q;
	(void)msg;
	(void)data;
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	if (!ph)
		return 0;
	if (ring_len == ring_cap) {
		/* Cannot happen with the ring twice the kernel queue; stay correct anyway. */
		release(1);
		n_early++;
	}
	ring[(ring_head + ring_len) % ring_cap] = (struct held){ntohl(ph->packet_id), arrival_ns + delay_ns};
	ring_len++;
	n_packets++;
	if (ring_len > max_held)
		max_held = ring_len;
	return 0;
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static unsigned long number(const char *s, const char *flag)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-') {
		fprintf(stderr, "netdelay: %s wants a non-negative integer, got '%s'\n", flag, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	unsigned long queue = 0, delay_ms = 0, maxlen = 65536, rcvbuf = 64ul << 20;
	const char *ready = NULL;
	int have_q = 0, have_d = 0, opt;
	while ((opt = getopt(argc, argv, "q:d:m:b:r:")) != -1) {
		switch (opt) {
		case 'q': queue = number(optarg, "-q"); have_q = 1; break;
		case 'd': delay_ms = number(optarg, "-d"); have_d = 1; break;
		case 'm': maxlen = number(optarg, "-m"); break;
		case 'b': rcvbuf = number(optarg, "-b"); break;
		case 'r': ready = optarg; break;
		default: have_q = 0; break;
		}
	}
	if (!have_q || !have_d || optind != argc || queue > 65535 || delay_ms > 60000 || maxlen < 16 ||
	    maxlen > (1ul << 24)) {
		fprintf(stderr, "usage: netdelay -q QUEUE(0-65535) -d DELAY_MS(0-60000) [-m MAXLEN] [-b RCVBUF] "
				"[-r READY_FILE]\n");
		return 2;
	}
	delay_ns = (uint64_t)delay_ms * 1000000u;
	ring_cap = 2 * maxlen;
	ring = calloc(ring_cap, sizeof *ring);
	if (!ring)
		die("calloc");

	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	struct nfq_handle *h = nfq_open();
	if (!h)
		die("nfq_open");
	qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
	if (!qh)
		die("nfq_create_queue (queue taken, or not root in this namespace?)");
	if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0)
		die("nfq_set_mode");
	if (nfq_set_queue_maxlen(qh, (uint32_t)maxlen) < 0)
		die("nfq_set_queue_maxlen");
	uint32_t flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO;
	if (nfq_set_queue_flags(qh, flags, flags) < 0)
		die("nfq_set_queue_flags");

	int fd = nfq_fd(h);
	int size = rcvbuf > 0x7fffffff ? 0x7fffffff : (int)rcvbuf;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size) < 0)
		die("SO_RCVBUF");
	int one = 1;
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

	if (ready) {
		FILE *f = fopen(ready, "w");
		if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0)
			die("writing the ready file");
	}
	fprintf(stderr, "netdelay: queue %lu, delay %lu ms, maxlen %lu, pid %d\n", queue, delay_ms, maxlen,
		(int)getpid());

	static char buf[1 << 17] __attribute__((aligned));
	while (!stop) {
		uint64_t now = now_ns();
		release_due(now);
		int timeout_ms = 200;
		if (ring_len) {
			uint64_t due = ring[ring_head].due_ns;
			uint64_t wait = due > now ? due - now : 0;
			timeout_ms = (int)((wait + 999999u) / 1000000u);
		}
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r = poll(&p, 1, timeout_ms);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (r == 0)
			continue;
		/* Drain what is there, but come back to releases at least every 256 reads. */
		for (int i = 0; i < 256; i++) {
			ssize_t n = recv(fd, buf, sizeof buf, 0);
			if (n < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
					break;
				if (errno == ENOBUFS) {
					n_enobufs++;
					continue;
				}
				die("recv");
			}
			arrival_ns = now_ns();
			nfq_handle_packet(h, buf, (int)n);
			if (delay_ns == 0)
				release_due(arrival_ns);
		}
	}
	release(ring_len);
	fprintf(stderr,
		"netdelay: exit: %llu packets, %llu batch verdicts, at most %llu held, %llu released early, %llu "
		"ENOBUFS\n",
		(unsigned long long)n_packets, (unsigned long long)n_batches, (unsigned long long)max_held,
		(unsigned long long)n_early, (unsigned long long)n_enobufs);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
