/*
 * udamon_report_demo: a producer that reports its own memory accesses to a udamon
 * session through udamon_report.h (the reference C client, built by the tests).
 *
 *   udamon_report_demo --socket PATH [--mode pinned|flood] [options]
 *
 * pinned (default): thread "reader" pinned to --reader-cpu reads one word of every
 *   page of buffer R, thread "writer" pinned to --writer-cpu writes every page of W;
 *   each access is reported as it is made (pid, tid, sched_getcpu(), now), one pass
 *   per --pause-us (default 10000).  Buffer I is mapped and never touched.  Each
 *   thread is its own producer (a reporter per thread).
 * flood: --producers N threads each send --count reports as fast as they can
 *   (addresses cycling over R, reads), to measure the channel; with --duration they
 *   stop after that many seconds even if --count is not reached.
 *
 * stdout, one JSON line each, flushed:
 *   {"event":"start","pid":P,"reader_tid":T,"writer_tid":T,"R":[a,b],"W":[a,b],"I":[a,b]}
 *     (pinned: printed before the threads connect; flood: once all are connected)
 *   {"event":"end","sent":N,"dropped":D,"elapsed_ns":E,"flood_ns":F,"intact":true}
 * (flood_ns: from the moment every producer was connected to the end, close included)
 * (flood: reader_tid/writer_tid are -1.)  --block waits for room instead of
 * dropping.  Exit 0; 1 when the session refused or was not there; 2 bad usage.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "udamon_report.h"

#define PAGE 4096

static const char *sock_path;
static int reader_cpu = 0, writer_cpu = 1, block_mode = 0, nprod = 1;
static long pause_us = 10000;
static double duration_s = 5.0;
static int duration_given;
static int64_t flood_deadline; /* flood with --duration: stop sending then */
static size_t buf_size = 4u << 20;
static long long count = 1000000;
static volatile uint64_t *R, *W, *I;
static atomic_int stop_flag, tid_r = -1, tid_w = -1, failed, ready;
static atomic_ullong total_sent, total_dropped;
static volatile sig_atomic_t got_signal;

static void on_signal(int s) { (void)s; got_signal = 1; }

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static int open_reporter(struct udamon_reporter *r, const char *name)
{
	int e = udamon_reporter_open(r, sock_path, name, block_mode ? UDAMON_REPORT_BLOCK : 0,
				     5000);
	if (e < 0) {
		fprintf(stderr, "udamon_report_demo: %s: %s\n", sock_path, strerror(-e));
		atomic_store(&failed, 1);
	}
	return e;
}

static void finish(struct udamon_reporter *r)
{
	udamon_reporter_close(r, 5000);
	atomic_fetch_add(&total_sent, r->sent);
	atomic_fetch_add(&total_dropped, r->dropped);
}

static void nap(void)
{
	struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
	if (pause_us > 0)
		nanosleep(&ts, NULL);
}

static void *pinned_thread(void *arg)
{
	int writer = arg != NULL;
	static struct udamon_reporter rr, rw; /* big: not on the stack */
	struct udamon_reporter *r = writer ? &rw : &rr;
	pin(writer ? writer_cpu : reader_cpu);
	int tid = (int)syscall(SYS_gettid), pid = getpid();
	atomic_store(writer ? &tid_w : &tid_r, tid);
	if (open_reporter(r, writer ? "demo-writer" : "demo-reader") < 0) {
		atomic_fetch_add(&ready, 1);
		return NULL;
	}
	atomic_fetch_add(&ready, 1);
	volatile uint64_t *buf = writer ? W : R;
	size_t words = buf_size / 8, step = PAGE / 8;
	uint64_t sum = 0, pass = 0;
	while (!atomic_load(&stop_flag)) {
		int cpu = sched_getcpu();
		for (size_t i = 0; i < words; i += step) {
			if (writer)
				buf[i] = pass + 1;
			else
				sum += buf[i];
			udamon_report_access(r, pid, tid, cpu, (uint64_t)(uintptr_t)&buf[i], 8, writer);
		}
		pass++;
		nap();
	}
	if (sum == 42)
		fputc(' ', stderr);
	finish(r);
	return NULL;
}

static void *flood_thread(void *arg)
{
	struct udamon_reporter *r = malloc(sizeof(*r));
	char name[32];
	snprintf(name, sizeof(name), "flood-%ld", (long)(intptr_t)arg);
	if (!r || open_reporter(r, name) < 0) {
		atomic_fetch_add(&ready, 1);
		free(r);
		return NULL;
	}
	atomic_fetch_add(&ready, 1);
	while (atomic_load(&ready) < nprod)
		;
	int pid = getpid(), tid = (int)syscall(SYS_gettid);
	struct udamon_report_rec rec;
	memset(&rec, 0, sizeof(rec));
	rec.pid = pid;
	rec.tid = tid;
	rec.cpu = sched_getcpu();
	rec.node = -1;
	rec.size = 8;
	uint64_t base = (uint64_t)(uintptr_t)R, pages = buf_size / PAGE;
	for (long long i = 0; i < count && !got_signal; i++) {
		rec.addr = base + (uint64_t)(i % pages) * PAGE;
		if (!(i & 255)) {
			rec.time_ns = udamon_now_ns();
			if (flood_deadline && rec.time_ns > flood_deadline)
				break;
		}
		udamon_report(r, &rec);
	}
	finish(r);
	free(r);
	return NULL;
}

static void *map_buf(void)
{
	void *p = mmap(NULL, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	memset(p, 1, buf_size);
	return p;
}

static int usage(const char *why)
{
	fprintf(stderr, "udamon_report_demo: %s (see the comment at the top of the source)\n", why);
	return 2;
}

int main(int argc, char **argv)
{
	const char *mode = "pinned";
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--block")) {
			block_mode = 1;
			continue;
		}
		if (!v)
			return usage("option without a value");
		i++;
		if (!strcmp(a, "--socket"))
			sock_path = v;
		else if (!strcmp(a, "--mode"))
			mode = v;
		else if (!strcmp(a, "--reader-cpu"))
			reader_cpu = atoi(v);
		else if (!strcmp(a, "--writer-cpu"))
			writer_cpu = atoi(v);
		else if (!strcmp(a, "--pause-us"))
			pause_us = atol(v);
		else if (!strcmp(a, "--duration"))
			duration_s = atof(v), duration_given = 1;
		else if (!strcmp(a, "--size"))
			buf_size = (size_t)atol(v) << 20;
		else if (!strcmp(a, "--count"))
			count = atoll(v);
		else if (!strcmp(a, "--producers"))
			nprod = atoi(v);
		else
			return usage("unknown option");
	}
	if (!sock_path)
		return usage("--socket PATH is required");
	if (strcmp(mode, "pinned") && strcmp(mode, "flood"))
		return usage("--mode is pinned or flood");
	if (nprod < 1 || nprod > 64 || buf_size == 0)
		return usage("bad --producers or --size");
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	R = map_buf();
	W = map_buf();
	I = map_buf();
	int pinned = !strcmp(mode, "pinned");
	int n = pinned ? 2 : nprod;
	pthread_t th[64];
	int64_t t0 = udamon_now_ns();
	if (!pinned && duration_given) /* counted from the start; connecting takes ms */
		flood_deadline = t0 + (int64_t)(duration_s * 1e9);
	for (int i = 0; i < n; i++)
		pthread_create(&th[i], NULL, pinned ? pinned_thread : flood_thread,
			       (void *)(intptr_t)(pinned ? i : i + 1));
	/* pinned: the start line comes as soon as the threads run (before they connect: a
	 * session may need the buffer addresses first); flood: once every producer is
	 * connected (the flood starts then) */
	while (pinned ? (atomic_load(&tid_r) < 0 || atomic_load(&tid_w) < 0)
		      : atomic_load(&ready) < n)
		usleep(1000);
	printf("{\"event\":\"start\",\"pid\":%d,\"reader_tid\":%d,\"writer_tid\":%d,"
	       "\"R\":[%llu,%llu],\"W\":[%llu,%llu],\"I\":[%llu,%llu]}\n",
	       getpid(), atomic_load(&tid_r), atomic_load(&tid_w),
	       (unsigned long long)(uintptr_t)R, (unsigned long long)(uintptr_t)R + buf_size,
	       (unsigned long long)(uintptr_t)W, (unsigned long long)(uintptr_t)W + buf_size,
	       (unsigned long long)(uintptr_t)I, (unsigned long long)(uintptr_t)I + buf_size);
	fflush(stdout);
	int64_t t_flood = udamon_now_ns(); /* flood: every producer is connected now */
	if (pinned) {
		int64_t end = t0 + (int64_t)(duration_s * 1e9);
		while (!got_signal && udamon_now_ns() < end && !atomic_load(&failed))
			usleep(10000);
		atomic_store(&stop_flag, 1);
	}
	for (int i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	int64_t now = udamon_now_ns(), elapsed = now - t0, flood_ns = now - t_flood;
	int intact = 1;
	for (size_t i = 0; i < buf_size / 8; i += PAGE / 8)
		intact &= R[i] == 0x0101010101010101ull && I[i] == 0x0101010101010101ull;
	printf("{\"event\":\"end\",\"sent\":%llu,\"dropped\":%llu,\"elapsed_ns\":%lld,"
	       "\"flood_ns\":%lld,\"intact\":%s}\n",
	       (unsigned long long)atomic_load(&total_sent),
	       (unsigned long long)atomic_load(&total_dropped), (long long)elapsed,
	       (long long)flood_ns, intact ? "true" : "false");
	fflush(stdout);
	return atomic_load(&failed) ? 1 : 0;
}
