/*
 * llc_pairs: two pairs of threads that share data within each pair, never across,
 * for cache-aware placement (udamon place).
 *
 *   a0, a1 share buffer A and both WRITE it: a0 stores to the even 64-byte lines of
 *     every page and reads the odd ones, a1 the other way round (write sharing: each
 *     page is written by both threads, what costs coherence traffic across LLCs);
 *   b0, b1 share buffer B READ-ONLY: both read every line of it (read sharing).
 * No thread touches the other pair's buffer.  The threads do not pin themselves:
 * where they run is left to the caller (taskset, sched_setaffinity, udamon place).
 *
 * Threads are named (comm) a0, a1, b0, b1, idle and late.
 * The buffers (--size MiB each, default 2) are separate anonymous mappings with an
 * unmapped page before, between and after them, THP off, populated before anything
 * is printed.  A fifth thread, "idle", sleeps; SIGUSR1 makes it exit, SIGUSR2 starts
 * one more sleeping thread ("late"), so that callers can make threads leave and
 * appear at a moment they choose.  --pause-us N makes each worker sleep N µs after
 * each pass (default 0), leaving CPU time to a monitor on emulated machines.
 *
 * stdout, one JSON object per line, flushed:
 *   {"event":"start","pid":P,"page_size":N,"tids":{"a0":T,"a1":T,"b0":T,"b1":T,
 *    "idle":T},"A":[start,end],"B":[start,end]}
 *   {"event":"idle-exited","tid":T}           (after SIGUSR1)
 *   {"event":"late-started","tid":T}          (after SIGUSR2)
 *   {"event":"end","passes":{"a0":N,...},"intact":true|false}
 * Integrity: each writer checks, in every pass, that its own lines hold what it just
 * wrote; the readers check B's checksum on every pass.  Runs for
 * --duration seconds (default 300) or until SIGTERM/SIGINT; exits 0 when the data
 * are intact, 3 when corrupted, 2 on bad usage, 1 on error.
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
#include <time.h>
#include <unistd.h>

#define LINE 64
#define WORDS_PER_LINE (LINE / sizeof(uint64_t))

struct worker {
	const char *name;
	uint64_t *buf;
	int parity; /* writers: the lines (index % 2) this one writes; -1: reader */
	atomic_int tid;
	uint64_t passes;
	int bad;
};

static size_t buf_size, page_size;
static long pause_us;
static atomic_int stop_flag, idle_stop;
static uint64_t b_sum;
static struct worker w_a0 = {.name = "a0", .parity = 0, .tid = -1};
static struct worker w_a1 = {.name = "a1", .parity = 1, .tid = -1};
static struct worker w_b0 = {.name = "b0", .parity = -1, .tid = -1};
static struct worker w_b1 = {.name = "b1", .parity = -1, .tid = -1};
static struct worker *workers[] = {&w_a0, &w_a1, &w_b0, &w_b1};
static atomic_int idle_tid = -1, late_tid = -1;

static uint64_t val(uint64_t pass, size_t i) { return (pass << 40) ^ (i * 0x9E3779B97F4A7C15ull) ^ 1; }

static void die(const char *what)
{
	fprintf(stderr, "llc_pairs: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void pause_a_bit(void)
{
	if (pause_us > 0) {
		struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
		nanosleep(&ts, NULL);
	}
}

static void *work(void *arg)
{
	struct worker *w = arg;
	pthread_setname_np(pthread_self(), w->name);
	atomic_store(&w->tid, (int)syscall(SYS_gettid));
	size_t lines = buf_size / LINE;
	volatile uint64_t *b = w->buf;
	uint64_t sink = 0;
	while (!atomic_load(&stop_flag)) {
		if (w->parity < 0) { /* reader of B */
			uint64_t s = 0;
			for (size_t l = 0; l < lines; l++)
				s += b[l * WORDS_PER_LINE];
			if (s != b_sum)
				w->bad = 1;
		} else {
			/* writer of A: a write sweep over its own lines, then a read sweep that
			 * checks them and reads the partner's (so the first touch of a page
			 * after a NUMA hint is a write about half of the time) */
			uint64_t pass = w->passes + 1;
			for (size_t l = w->parity; l < lines; l += 2)
				b[l * WORDS_PER_LINE] = val(pass, l * WORDS_PER_LINE);
			for (size_t l = 0; l < lines; l++) {
				uint64_t v = b[l * WORDS_PER_LINE];
				if ((int)(l % 2) == w->parity) {
					if (v != val(pass, l * WORDS_PER_LINE))
						w->bad = 1;
				} else {
					sink += v;
				}
			}
		}
		w->passes++;
		pause_a_bit();
	}
	return (void *)(uintptr_t)(sink & 1);
}

static void *idle(void *arg)
{
	atomic_int *tid = arg;
	pthread_setname_np(pthread_self(), tid == &idle_tid ? "idle" : "late");
	atomic_store(tid, (int)syscall(SYS_gettid));
	while (!atomic_load(&stop_flag) && (tid != &idle_tid || !atomic_load(&idle_stop)))
		usleep(10000);
	return NULL;
}

static uint64_t *map_at(uint8_t *at)
{
	void *p = mmap(at, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
		       -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	madvise(p, buf_size, MADV_NOHUGEPAGE);
	return p;
}

static void usage(void)
{
	fprintf(stderr, "usage: llc_pairs [--size MIB] [--duration SEC] [--pause-us N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double duration = 300, size_mib = 2;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--size"))
			size_mib = atof(argv[++i]);
		else if (!strcmp(argv[i], "--duration"))
			duration = atof(argv[++i]);
		else if (!strcmp(argv[i], "--pause-us"))
			pause_us = atol(argv[++i]);
		else
			usage();
	}
	if (size_mib <= 0 || duration <= 0 || pause_us < 0)
		usage();
	page_size = (size_t)sysconf(_SC_PAGESIZE);
	buf_size = ((size_t)(size_mib * (1 << 20)) + page_size - 1) / page_size * page_size;

	/* [hole][A][hole][B][hole] */
	size_t total = 2 * buf_size + 3 * page_size;
	uint8_t *base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		die("mmap");
	uint64_t *A = map_at(base + page_size), *B = map_at(base + 2 * page_size + buf_size);
	munmap(base, page_size);
	munmap(base + page_size + buf_size, page_size);
	munmap(base + 2 * page_size + 2 * buf_size, page_size);
	size_t words = buf_size / sizeof(uint64_t);
	for (size_t i = 0; i < words; i++) {
		A[i] = val(0, i);
		B[i] = val(0, i) * 3;
	}
	for (size_t i = 0; i < words; i += WORDS_PER_LINE)
		b_sum += B[i];
	w_a0.buf = w_a1.buf = A;
	w_b0.buf = w_b1.buf = B;

	/* every thread inherits the blocked set; the main thread takes signals synchronously */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
		die("pthread_sigmask");
	pthread_t th[4], ti, tl;
	int have_late = 0;
	for (int k = 0; k < 4; k++)
		if (pthread_create(&th[k], NULL, work, workers[k]))
			die("pthread_create");
	if (pthread_create(&ti, NULL, idle, &idle_tid))
		die("pthread_create");
	for (int k = 0; k < 4; k++)
		while (atomic_load(&workers[k]->tid) < 0)
			usleep(1000);
	while (atomic_load(&idle_tid) < 0)
		usleep(1000);
	printf("{\"event\":\"start\",\"pid\":%d,\"page_size\":%zu,\"tids\":{", (int)getpid(), page_size);
	for (int k = 0; k < 4; k++)
		printf("\"%s\":%d,", workers[k]->name, atomic_load(&workers[k]->tid));
	printf("\"idle\":%d},\"A\":[%lu,%lu],\"B\":[%lu,%lu]}\n", atomic_load(&idle_tid),
	       (unsigned long)A, (unsigned long)A + buf_size, (unsigned long)B,
	       (unsigned long)B + buf_size);
	fflush(stdout);

	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		double left = duration - ((now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9);
		if (left <= 0)
			break;
		struct timespec to = {0, (long)((left > 0.2 ? 0.2 : left) * 1e9)};
		int sig = sigtimedwait(&set, NULL, &to);
		if (sig == SIGTERM || sig == SIGINT)
			break;
		if (sig == SIGUSR1 && !atomic_load(&idle_stop)) {
			atomic_store(&idle_stop, 1);
			pthread_join(ti, NULL);
			printf("{\"event\":\"idle-exited\",\"tid\":%d}\n", atomic_load(&idle_tid));
			fflush(stdout);
		} else if (sig == SIGUSR2 && !have_late) {
			if (pthread_create(&tl, NULL, idle, &late_tid))
				die("pthread_create");
			have_late = 1;
			while (atomic_load(&late_tid) < 0)
				usleep(1000);
			printf("{\"event\":\"late-started\",\"tid\":%d}\n", atomic_load(&late_tid));
			fflush(stdout);
		}
	}
	atomic_store(&stop_flag, 1);
	for (int k = 0; k < 4; k++)
		pthread_join(th[k], NULL);
	if (!atomic_load(&idle_stop))
		pthread_join(ti, NULL);
	if (have_late)
		pthread_join(tl, NULL);
	int intact = 1;
	for (int k = 0; k < 4; k++)
		intact &= !workers[k]->bad;
	uint64_t s = 0;
	for (size_t l = 0; l < buf_size / LINE; l++) {
		size_t i = l * WORDS_PER_LINE;
		struct worker *w = l % 2 ? &w_a1 : &w_a0;
		if (A[i] != val(w->passes, i))
			intact = 0;
		s += B[i];
	}
	if (s != b_sum)
		intact = 0;
	printf("{\"event\":\"end\",\"passes\":{");
	for (int k = 0; k < 4; k++)
		printf("%s\"%s\":%lu", k ? "," : "", workers[k]->name, (unsigned long)workers[k]->passes);
	printf("},\"intact\":%s}\n", intact ? "true" : "false");
	fflush(stdout);
	return intact ? 0 : 3;
}
