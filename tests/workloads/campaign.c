/*
 * campaign: self-checking targets for the reliability campaign (tests/test_campaign.py,
 * bench/bench_campaign.py).  Every mode keeps data it can verify and exits 3 the moment
 * something does not hold what it wrote, so "the target was harmed" is measured by the
 * target itself, not guessed from outside.
 *
 *   campaign checksum [opts]   --threads N worker threads (default 2), each owning a
 *                              slice of one --size MiB anonymous buffer: every pass
 *                              first verifies that each 64-byte line of its slice holds
 *                              the previous pass's value, then writes the next (and
 *                              reads it back).  --thp: the buffer is 2 MiB aligned and
 *                              MADV_HUGEPAGE (else MADV_NOHUGEPAGE).
 *   campaign zombie [opts]     the same, but the main thread calls pthread_exit() right
 *                              after the start line: a process whose leader is a zombie
 *                              while its workers run.  The last worker exits the process.
 *   campaign forkserver [opts] a single-threaded server: each round writes a new pattern
 *                              over the buffer, verifies it, and forks a child that
 *                              verifies its copy, overwrites a quarter of it, verifies
 *                              that and exits (3 on a mismatch); children are reaped
 *                              without blocking and a failed child counts as corruption.
 *   campaign mremap [opts]     a heap that grows with mremap(MREMAP_MAYMOVE) from 1/8 of
 *                              --size to --size and shrinks back, round after round;
 *                              every step verifies the part that was kept and fills the
 *                              new part; a failed mremap is a failure (exit 3).
 *
 * Options: --duration S (float, default 10; also ends on SIGTERM/SIGINT), --size MiB
 * (default 16), --threads N, --pause-us N (sleep between passes, default 0), --thp.
 *
 * stdout (flushed): the start line {"event":"start","pid":P,"buf":[lo,hi],"tids":[...]}
 * ("tids" lists the worker threads; "buf" is the initial buffer) and, at the end,
 * {"event":"end","passes":N,"intact":true|false,"errors":E}.  Exit 0 when intact, 3
 * when not, 2 on bad usage, 1 on a system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LINE 64
#define WORDS_PER_LINE (LINE / sizeof(uint64_t))

static size_t buf_size;
static uint64_t *buf;
static int nthreads = 2;
static long pause_us;
static double deadline;
static volatile sig_atomic_t got_signal;
static atomic_ulong passes, errors;
static atomic_int running;
static int *tids;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int done(void) { return got_signal || now_s() >= deadline; }

static void on_signal(int sig) { (void)sig; got_signal = 1; }

static void nap(void)
{
	if (pause_us > 0) {
		struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
		nanosleep(&ts, NULL);
	}
}

static uint64_t val(uint64_t pass, size_t i, uint64_t salt)
{
	return (pass << 40) ^ (i * 0x9E3779B97F4A7C15ull) ^ salt;
}

/* verify [lo, hi) words (one per line) hold pass `p`, then write pass p + 1 */
static unsigned long check_and_write(uint64_t *b, size_t lo, size_t hi, uint64_t p,
				     uint64_t salt)
{
	unsigned long bad = 0;
	for (size_t i = lo; i < hi; i += WORDS_PER_LINE)
		if (((volatile uint64_t *)b)[i] != val(p, i, salt))
			bad++;
	for (size_t i = lo; i < hi; i += WORDS_PER_LINE)
		((volatile uint64_t *)b)[i] = val(p + 1, i, salt);
	for (size_t i = lo; i < hi; i += WORDS_PER_LINE)
		if (((volatile uint64_t *)b)[i] != val(p + 1, i, salt))
			bad++;
	return bad;
}

static void finish_line(void)
{
	printf("{\"event\":\"end\",\"passes\":%lu,\"intact\":%s,\"errors\":%lu}\n",
	       atomic_load(&passes), atomic_load(&errors) ? "false" : "true",
	       atomic_load(&errors));
	fflush(stdout);
}

struct worker { int idx; size_t lo, hi; };

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	tids[w->idx] = (int)syscall(SYS_gettid);
	uint64_t p = 0;
	while (!done()) {
		unsigned long bad = check_and_write(buf, w->lo, w->hi, p, (uint64_t)w->idx << 8);
		if (bad) {
			fprintf(stderr, "campaign: thread %d: %lu words wrong after pass %lu\n",
				w->idx, bad, (unsigned long)p);
			atomic_fetch_add(&errors, bad);
		}
		p++;
		atomic_fetch_add(&passes, 1);
		nap();
	}
	if (atomic_fetch_sub(&running, 1) == 1) {  /* the last one out ends the process */
		finish_line();
		exit(atomic_load(&errors) ? 3 : 0);
	}
	return NULL;
}

static void *alloc(size_t size, int thp)
{
	size_t align = thp ? (2u << 20) : 4096;
	char *p = mmap(NULL, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);
	if (p == MAP_FAILED) {
		fprintf(stderr, "campaign: mmap: %s\n", strerror(errno));
		exit(1);
	}
	char *a = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
	if (a > p)
		munmap(p, a - p);
	munmap(a + size, (p + size + align) - (a + size));
	madvise(a, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return a;
}

static void start_line(void)
{
	printf("{\"event\":\"start\",\"pid\":%d,\"buf\":[%lu,%lu],\"tids\":[", (int)getpid(),
	       (unsigned long)(uintptr_t)buf, (unsigned long)((uintptr_t)buf + buf_size));
	for (int i = 0; i < nthreads; i++)
		printf("%s%d", i ? "," : "", tids[i]);
	printf("]}\n");
	fflush(stdout);
}

static int threaded(int zombie, int thp)
{
	buf = alloc(buf_size, thp);
	size_t words = buf_size / sizeof(uint64_t);
	tids = calloc(nthreads, sizeof(int));
	struct worker *ws = calloc(nthreads, sizeof(*ws));
	atomic_store(&running, nthreads);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (int t = 0; t < nthreads; t++) {  /* line-aligned slices, pass 0 in each */
		size_t lo = words * t / nthreads, hi = words * (t + 1) / nthreads;
		ws[t] = (struct worker){t, lo - lo % WORDS_PER_LINE, hi - hi % WORDS_PER_LINE};
		if (t == nthreads - 1)
			ws[t].hi = words;
		for (size_t i = ws[t].lo; i < ws[t].hi; i += WORDS_PER_LINE)
			buf[i] = val(0, i, (uint64_t)t << 8);
	}
	for (int t = 0; t < nthreads; t++) {
		pthread_t th;
		if (pthread_create(&th, &attr, worker_main, &ws[t]) != 0) {
			fprintf(stderr, "campaign: pthread_create %d: %s\n", t, strerror(errno));
			exit(1);
		}
		pthread_detach(th);
	}
	for (int t = 0; t < nthreads; t++)
		while (!__atomic_load_n(&tids[t], __ATOMIC_SEQ_CST))
			usleep(100);
	start_line();
	if (zombie)
		pthread_exit(NULL);
	for (;;)
		pause();  /* the last worker exits the process */
}

static int forkserver(void)
{
	nthreads = 0;
	buf = alloc(buf_size, 0);
	size_t words = buf_size / sizeof(uint64_t);
	for (size_t i = 0; i < words; i += WORDS_PER_LINE)
		buf[i] = val(0, i, 7);
	tids = calloc(1, sizeof(int));
	start_line();
	uint64_t p = 0;
	unsigned long children = 0;
	while (!done()) {
		unsigned long bad = check_and_write(buf, 0, words, p, 7);
		p++;
		if (bad)
			atomic_fetch_add(&errors, bad);
		pid_t c = fork();
		if (c == 0) {  /* the child: its copy holds pass p */
			unsigned long cb = check_and_write(buf, 0, words / 4, p, 7);
			for (size_t i = words / 4; i < words; i += WORDS_PER_LINE)
				if (buf[i] != val(p, i, 7))
					cb++;
			_exit(cb ? 3 : 0);
		}
		if (c > 0)
			children++;
		int st;
		pid_t r;
		while ((r = waitpid(-1, &st, c > 0 && children % 8 == 0 ? 0 : WNOHANG)) > 0)
			if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
				fprintf(stderr, "campaign: child %d failed (status %#x)\n", r, st);
				atomic_fetch_add(&errors, 1);
			}
		atomic_fetch_add(&passes, 1);
		nap();
	}
	int st;
	pid_t r;
	while ((r = wait(&st)) > 0)
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			atomic_fetch_add(&errors, 1);
	finish_line();
	return atomic_load(&errors) ? 3 : 0;
}

static int remap(void)
{
	nthreads = 0;
	size_t lo = buf_size / 8, step = buf_size / 16, size = lo;
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 1;
	size_t words = size / sizeof(uint64_t);
	for (size_t i = 0; i < words; i += WORDS_PER_LINE)
		buf[i] = val(0, i, 9);
	tids = calloc(1, sizeof(int));
	start_line();
	int grow = 1;
	while (!done()) {
		size_t next = grow ? size + step : size - step;
		if (next > buf_size) { grow = 0; continue; }
		if (next < lo) { grow = 1; continue; }
		uint64_t *nb = mremap(buf, size, next, MREMAP_MAYMOVE);
		if (nb == MAP_FAILED) {
			fprintf(stderr, "campaign: mremap %zu -> %zu: %s\n", size, next, strerror(errno));
			atomic_fetch_add(&errors, 1);
			break;
		}
		buf = nb;
		size_t keep = (next < size ? next : size) / sizeof(uint64_t);
		for (size_t i = 0; i < keep; i += WORDS_PER_LINE)
			if (buf[i] != val(0, i, 9))
				atomic_fetch_add(&errors, 1);
		for (size_t i = keep; i < next / sizeof(uint64_t); i += WORDS_PER_LINE)
			buf[i] = val(0, i, 9);
		size = next;
		atomic_fetch_add(&passes, 1);
		nap();
	}
	finish_line();
	return atomic_load(&errors) ? 3 : 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: campaign checksum|zombie|forkserver|mremap [--duration S] "
			"[--size MiB] [--threads N] [--pause-us N] [--thp]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	const char *mode = argv[1];
	double duration = 10;
	long size_mib = 16;
	int thp = 0;
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--thp")) { thp = 1; continue; }
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		char *end;
		if (!strcmp(a, "--duration")) duration = strtod(v, &end);
		else if (!strcmp(a, "--size")) size_mib = strtol(v, &end, 10);
		else if (!strcmp(a, "--threads")) nthreads = (int)strtol(v, &end, 10);
		else if (!strcmp(a, "--pause-us")) pause_us = strtol(v, &end, 10);
		else usage();
		if (*end || size_mib < 1 || nthreads < 1)
			usage();
	}
	buf_size = (size_t)size_mib << 20;
	deadline = now_s() + duration;
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (!strcmp(mode, "checksum"))
		return threaded(0, thp);
	if (!strcmp(mode, "zombie"))
		return threaded(1, thp);
	if (!strcmp(mode, "forkserver"))
		return forkserver();
	if (!strcmp(mode, "mremap"))
		return remap();
	usage();
	return 2;
}
