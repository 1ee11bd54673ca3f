/*
 * numa_remote: a workload with known NUMA hits and misses, for a two-node machine.
 *
 *   REMOTE thread (pinned to --remote-cpu, default 0) reads and writes buffer
 *     REMOTE, whose pages are bound to --remote-node (default 1);
 *   LOCAL thread (pinned to --local-cpu, default 1) reads and writes buffer
 *     LOCAL, bound to --local-node (default 1).
 * With the defaults on a machine whose CPU 0 is on node 0 and CPU 1 on node 1,
 * every access of the REMOTE thread is a NUMA miss and every access of the
 * LOCAL thread a hit.  Each thread alternates a read pass (sum of one word per
 * 64-byte line) and a write pass (stores), so both reads and writes happen.
 *
 * The buffers (--size MiB each, default 4) are page-aligned anonymous memory
 * with an unmapped page before, between and after them (so they are separate
 * mappings), THP off, bound with mbind(MPOL_BIND | MPOL_F_NUMA_BALANCING) so
 * that NUMA balancing still scans them (hinting faults) but cannot move them
 * off the bound node (plain MPOL_BIND where the kernel refuses the flag; then
 * the kernel does not scan them), and populated before anything is printed.
 *
 * stdout, one JSON object per line, flushed:
 *   {"event":"start","pid":P,"remote_tid":T,"local_tid":T,"remote_cpu":N,
 *    "local_cpu":N,"remote_node":N,"local_node":N,"mpol_numa_balancing":true|false,
 *    "REMOTE":[start,end],"LOCAL":[start,end],
 *    "REMOTE_pages":{"<node>":pages,...},"LOCAL_pages":{...}}
 *   {"event":"end","passes_remote":N,"passes_local":N,"REMOTE_pages":{...},
 *    "LOCAL_pages":{...},"intact":true|false}
 * (*_pages: where the buffer's pages are, from move_pages(2) in query mode.)
 * --pause-us N makes each thread sleep N µs after each pass (default 0), which
 * leaves CPU time to a monitor on small or emulated machines.
 * Runs for --duration seconds (default 30) or until SIGTERM/SIGINT; exits 0
 * when the data are intact, 3 when corrupted, 2 on bad usage, 1 on error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LINE 64
#define MPOL_BIND 2
#define MPOL_F_NUMA_BALANCING (1 << 13)
#define MAX_NODES 64

struct worker {
	const char *name;
	int cpu;
	uint64_t *buf;
	atomic_int tid;
	uint64_t passes; /* completed write passes */
	uint64_t last_written;
	int bad;
};

static size_t buf_size, page_size;
static long pause_us;
static atomic_int stop_flag;
static volatile sig_atomic_t got_signal;
static struct worker remote_w = {.name = "remote", .cpu = 0, .tid = -1};
static struct worker local_w = {.name = "local", .cpu = 1, .tid = -1};

static uint64_t val(uint64_t pass, size_t i) { return (pass << 40) ^ (i * 0x9E3779B97F4A7C15ull) ^ 1; }

static void die(const char *what)
{
	fprintf(stderr, "numa_remote: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(w->cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
	atomic_store(&w->tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t), step = LINE / sizeof(uint64_t);
	volatile uint64_t *b = w->buf;
	uint64_t sink = 0;
	while (!atomic_load(&stop_flag)) {
		/* read pass: check the last write pass is intact */
		uint64_t expect = w->last_written;
		for (size_t i = 0; i < words; i += step) {
			uint64_t v = b[i];
			sink += v;
			if (v != val(expect, i))
				w->bad = 1;
		}
		if (atomic_load(&stop_flag))
			break;
		/* write pass */
		uint64_t pass = w->passes + 1;
		for (size_t i = 0; i < words; i += step)
			b[i] = val(pass, i);
		w->passes = pass;
		w->last_written = pass;
		if (pause_us > 0) {
			struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
			nanosleep(&ts, NULL);
		}
	}
	return (void *)(uintptr_t)(sink & 1);
}

static uint64_t *alloc_bound(uint8_t *at, int node, int *flag_ok)
{
	void *p = mmap(at, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	madvise(p, buf_size, MADV_NOHUGEPAGE);
	unsigned long mask[MAX_NODES / (8 * sizeof(unsigned long))] = {0};
	mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
	if (syscall(SYS_mbind, p, buf_size, MPOL_BIND | MPOL_F_NUMA_BALANCING, mask, MAX_NODES + 1, 0) == 0) {
		*flag_ok = 1;
	} else {
		*flag_ok = 0;
		if (syscall(SYS_mbind, p, buf_size, MPOL_BIND, mask, MAX_NODES + 1, 0) != 0)
			die("mbind");
	}
	return p;
}

static void print_nodes(const char *key, uint64_t *buf)
{
	size_t n = buf_size / page_size;
	void **pages = malloc(n * sizeof(void *));
	int *status = malloc(n * sizeof(int));
	int count[MAX_NODES] = {0}, other = 0;
	for (size_t i = 0; i < n; i++)
		pages[i] = (uint8_t *)buf + i * page_size;
	if (syscall(SYS_move_pages, 0, n, pages, NULL, status, 0) != 0)
		die("move_pages");
	for (size_t i = 0; i < n; i++) {
		if (status[i] >= 0 && status[i] < MAX_NODES)
			count[status[i]]++;
		else
			other++;
	}
	printf("\"%s\":{", key);
	int first = 1;
	for (int i = 0; i < MAX_NODES; i++)
		if (count[i]) {
			printf("%s\"%d\":%d", first ? "" : ",", i, count[i]);
			first = 0;
		}
	if (other)
		printf("%s\"none\":%d", first ? "" : ",", other);
	printf("}");
	free(pages);
	free(status);
}

static void on_signal(int sig) { (void)sig; got_signal = 1; }

static void usage(void)
{
	fprintf(stderr, "usage: numa_remote [--size MIB] [--duration SEC] [--remote-cpu N] "
			"[--local-cpu N] [--remote-node N] [--local-node N] [--pause-us N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double duration = 30, size_mib = 4;
	int remote_node = 1, local_node = 1;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--size"))
			size_mib = atof(argv[++i]);
		else if (!strcmp(argv[i], "--duration"))
			duration = atof(argv[++i]);
		else if (!strcmp(argv[i], "--remote-cpu"))
			remote_w.cpu = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--local-cpu"))
			local_w.cpu = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--remote-node"))
			remote_node = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--pause-us"))
			pause_us = atol(argv[++i]);
		else if (!strcmp(argv[i], "--local-node"))
			local_node = atoi(argv[++i]);
		else
			usage();
	}
	if (size_mib <= 0 || remote_node < 0 || remote_node >= MAX_NODES || local_node < 0 ||
	    local_node >= MAX_NODES)
		usage();
	page_size = (size_t)sysconf(_SC_PAGESIZE);
	buf_size = ((size_t)(size_mib * (1 << 20)) + page_size - 1) / page_size * page_size;

	/* [hole][REMOTE][hole][LOCAL][hole] */
	size_t total = 2 * buf_size + 3 * page_size;
	uint8_t *base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		die("mmap");
	int ok_r, ok_l;
	remote_w.buf = alloc_bound(base + page_size, remote_node, &ok_r);
	local_w.buf = alloc_bound(base + 2 * page_size + buf_size, local_node, &ok_l);
	munmap(base, page_size);
	munmap(base + page_size + buf_size, page_size);
	munmap(base + 2 * page_size + 2 * buf_size, page_size);
	size_t words = buf_size / sizeof(uint64_t);
	for (size_t i = 0; i < words; i++) {
		remote_w.buf[i] = val(0, i);
		local_w.buf[i] = val(0, i);
	}

	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	pthread_t tr, tl;
	if (pthread_create(&tr, NULL, work, &remote_w) || pthread_create(&tl, NULL, work, &local_w))
		die("pthread_create");
	while (atomic_load(&remote_w.tid) < 0 || atomic_load(&local_w.tid) < 0)
		usleep(1000);

	printf("{\"event\":\"start\",\"pid\":%d,\"remote_tid\":%d,\"local_tid\":%d,"
	       "\"remote_cpu\":%d,\"local_cpu\":%d,\"remote_node\":%d,\"local_node\":%d,"
	       "\"mpol_numa_balancing\":%s,\"page_size\":%zu,"
	       "\"REMOTE\":[%lu,%lu],\"LOCAL\":[%lu,%lu],",
	       (int)getpid(), atomic_load(&remote_w.tid), atomic_load(&local_w.tid), remote_w.cpu,
	       local_w.cpu, remote_node, local_node, ok_r && ok_l ? "true" : "false", page_size,
	       (unsigned long)remote_w.buf, (unsigned long)remote_w.buf + buf_size,
	       (unsigned long)local_w.buf, (unsigned long)local_w.buf + buf_size);
	print_nodes("REMOTE_pages", remote_w.buf);
	printf(",");
	print_nodes("LOCAL_pages", local_w.buf);
	printf("}\n");
	fflush(stdout);

	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		double el = (now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9;
		if (got_signal || el >= duration)
			break;
		usleep(20000);
	}
	atomic_store(&stop_flag, 1);
	pthread_join(tr, NULL);
	pthread_join(tl, NULL);
	int intact = !remote_w.bad && !local_w.bad;
	for (size_t i = 0; i < words; i += LINE / sizeof(uint64_t)) {
		if (remote_w.buf[i] != val(remote_w.last_written, i) ||
		    local_w.buf[i] != val(local_w.last_written, i))
			intact = 0;
	}
	printf("{\"event\":\"end\",\"passes_remote\":%lu,\"passes_local\":%lu,",
	       (unsigned long)remote_w.passes, (unsigned long)local_w.passes);
	print_nodes("REMOTE_pages", remote_w.buf);
	printf(",");
	print_nodes("LOCAL_pages", local_w.buf);
	printf(",\"intact\":%s}\n", intact ? "true" : "false");
	fflush(stdout);
	return intact ? 0 : 3;
}
