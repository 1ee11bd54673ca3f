/*
 * numa_adjacent: four adjacent, equally hot buffers A B C D in ONE mapping, each bound to
 * a NUMA node, used from pinned threads so that two are always remote and two always
 * local -- the case where region-level NUMA estimates blur (equally hot neighbours of
 * different origin end up in one DAMON region).
 *
 *   buffers (--size MiB each, default 4), one anonymous mapping, THP off:
 *     A bound to --node-b (default 1), B to --node-a (0), C to --node-b (1), D to --node-a (0)
 *   thread 0, pinned to --cpu-a (default 0, a CPU of node-a): A (remote) and B (local)
 *   thread 1, pinned to --cpu-b (default 1, a CPU of node-b): C (local) and D (remote)
 *   with the defaults on a machine whose CPU 0 is on node 0 and CPU 1 on node 1:
 *   every access to A and D is a miss, every access to B and C a hit, and all four are
 *   read and written at the same rate (each thread alternates its two buffers; a pass
 *   reads one word per 64-byte line, checks it, then writes it).
 * Binding: mbind(MPOL_BIND | MPOL_F_NUMA_BALANCING): NUMA balancing still scans the
 * buffers (hinting faults) but cannot move their pages (plain MPOL_BIND if refused).
 *
 * stdout, one JSON object per line, flushed:
 *   {"event":"start","pid":P,"tids":[T0,T1],"cpus":[A,B],"nodes":{"A":n,...},
 *    "page_size":N,"A":[start,end],...,"pages":{"A":{"<node>":pages},...}}
 *   {"event":"end","passes":[N0,N1],"pages":{...},"intact":true|false}
 * Runs for --duration seconds (default 30) or until SIGTERM/SIGINT; exits 0 when the
 * data are intact, 3 when corrupted, 2 on bad usage, 1 on error.
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

static size_t buf_size, page_size;
static uint8_t *base;
static atomic_int stop_flag;
static volatile sig_atomic_t got_signal;

struct worker {
	int cpu;
	int bufs[2]; /* indices of A..D */
	atomic_int tid;
	uint64_t passes;
	uint64_t last[2];
	int bad;
};

static struct worker w[2] = {{.cpu = 0, .bufs = {0, 1}, .tid = -1},
			     {.cpu = 1, .bufs = {2, 3}, .tid = -1}};

static uint64_t val(int buf, uint64_t pass, size_t i)
{
	return ((uint64_t)buf << 56) ^ (pass << 40) ^ (i * 0x9E3779B97F4A7C15ull) ^ 1;
}

static uint64_t *buf_at(int k) { return (uint64_t *)(base + k * buf_size); }

static void die(const char *what)
{
	fprintf(stderr, "numa_adjacent: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *work(void *arg)
{
	struct worker *me = arg;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(me->cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
	atomic_store(&me->tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t), step = LINE / sizeof(uint64_t);
	while (!atomic_load(&stop_flag)) {
		uint64_t pass = me->passes + 1;
		for (int j = 0; j < 2 && !atomic_load(&stop_flag); j++) {
			volatile uint64_t *b = buf_at(me->bufs[j]);
			for (size_t i = 0; i < words; i += step) {
				if (b[i] != val(me->bufs[j], me->last[j], i))
					me->bad = 1;
				b[i] = val(me->bufs[j], pass, i);
			}
			me->last[j] = pass;
		}
		me->passes = pass;
	}
	return NULL;
}

static int bind(int k, int node)
{
	unsigned long mask[MAX_NODES / (8 * sizeof(unsigned long))] = {0};
	mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
	void *p = buf_at(k);
	if (syscall(SYS_mbind, p, buf_size, MPOL_BIND | MPOL_F_NUMA_BALANCING, mask,
		    MAX_NODES + 1, 0) == 0)
		return 1;
	if (syscall(SYS_mbind, p, buf_size, MPOL_BIND, mask, MAX_NODES + 1, 0) != 0)
		die("mbind");
	return 0;
}

static void print_pages(void)
{
	size_t n = buf_size / page_size;
	void **pages = malloc(n * sizeof(void *));
	int *status = malloc(n * sizeof(int));
	printf("\"pages\":{");
	for (int k = 0; k < 4; k++) {
		int count[MAX_NODES] = {0}, other = 0, first = 1;
		for (size_t i = 0; i < n; i++)
			pages[i] = (uint8_t *)buf_at(k) + i * page_size;
		if (syscall(SYS_move_pages, 0, n, pages, NULL, status, 0) != 0)
			die("move_pages");
		for (size_t i = 0; i < n; i++) {
			if (status[i] >= 0 && status[i] < MAX_NODES)
				count[status[i]]++;
			else
				other++;
		}
		printf("%s\"%c\":{", k ? "," : "", 'A' + k);
		for (int i = 0; i < MAX_NODES; i++)
			if (count[i]) {
				printf("%s\"%d\":%d", first ? "" : ",", i, count[i]);
				first = 0;
			}
		if (other)
			printf("%s\"none\":%d", first ? "" : ",", other);
		printf("}");
	}
	printf("}");
	free(pages);
	free(status);
}

static void on_signal(int sig) { (void)sig; got_signal = 1; }

static void usage(void)
{
	fprintf(stderr, "usage: numa_adjacent [--size MIB] [--duration SEC] [--cpu-a N] "
			"[--cpu-b N] [--node-a N] [--node-b N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double duration = 30, size_mib = 4;
	int node_a = 0, node_b = 1;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--size"))
			size_mib = atof(argv[++i]);
		else if (!strcmp(argv[i], "--duration"))
			duration = atof(argv[++i]);
		else if (!strcmp(argv[i], "--cpu-a"))
			w[0].cpu = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--cpu-b"))
			w[1].cpu = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--node-a"))
			node_a = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--node-b"))
			node_b = atoi(argv[++i]);
		else
			usage();
	}
	if (size_mib <= 0 || node_a < 0 || node_a >= MAX_NODES || node_b < 0 ||
	    node_b >= MAX_NODES)
		usage();
	page_size = (size_t)sysconf(_SC_PAGESIZE);
	buf_size = ((size_t)(size_mib * (1 << 20)) + page_size - 1) / page_size * page_size;
	base = mmap(NULL, 4 * buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		die("mmap");
	madvise(base, 4 * buf_size, MADV_NOHUGEPAGE);
	int node[4] = {node_b, node_a, node_b, node_a}, flag = 1;
	for (int k = 0; k < 4; k++)
		flag &= bind(k, node[k]);
	size_t words = buf_size / sizeof(uint64_t);
	for (int k = 0; k < 4; k++)
		for (size_t i = 0; i < words; i++)
			buf_at(k)[i] = val(k, 0, i);

	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	pthread_t th[2];
	for (int t = 0; t < 2; t++)
		if (pthread_create(&th[t], NULL, work, &w[t]))
			die("pthread_create");
	while (atomic_load(&w[0].tid) < 0 || atomic_load(&w[1].tid) < 0)
		usleep(1000);
	printf("{\"event\":\"start\",\"pid\":%d,\"tids\":[%d,%d],\"cpus\":[%d,%d],"
	       "\"nodes\":{\"A\":%d,\"B\":%d,\"C\":%d,\"D\":%d},\"mpol_numa_balancing\":%s,"
	       "\"page_size\":%zu,",
	       (int)getpid(), atomic_load(&w[0].tid), atomic_load(&w[1].tid), w[0].cpu, w[1].cpu,
	       node[0], node[1], node[2], node[3], flag ? "true" : "false", page_size);
	for (int k = 0; k < 4; k++)
		printf("\"%c\":[%lu,%lu],", 'A' + k, (unsigned long)buf_at(k),
		       (unsigned long)buf_at(k) + buf_size);
	print_pages();
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
	for (int t = 0; t < 2; t++)
		pthread_join(th[t], NULL);
	int intact = !w[0].bad && !w[1].bad;
	for (int t = 0; t < 2; t++)
		for (int j = 0; j < 2; j++)
			for (size_t i = 0; i < words; i += LINE / sizeof(uint64_t))
				if (buf_at(w[t].bufs[j])[i] != val(w[t].bufs[j], w[t].last[j], i))
					intact = 0;
	printf("{\"event\":\"end\",\"passes\":[%lu,%lu],", (unsigned long)w[0].passes,
	       (unsigned long)w[1].passes);
	print_pages();
	printf(",\"intact\":%s}\n", intact ? "true" : "false");
	fflush(stdout);
	return intact ? 0 : 3;
}
