/*
 * access_pattern: a workload with a known, per-thread, per-CPU access pattern.
 *
 *   READER thread (pinned to --reader-cpu) reads buffer R and reads buffer S;
 *   WRITER thread (pinned to --writer-cpu) writes buffer W and writes buffer S;
 *   buffer I is written once at start (populated) and never touched again.
 *
 * Every buffer is a page-aligned anonymous mmap of --size MiB (default 16),
 * populated by the main thread before anything is printed.  THP is disabled on
 * the buffers (MADV_NOHUGEPAGE) unless --thp is given, so faults are per page.
 *
 * stdout, one JSON object per line, flushed:
 *   start line: {"event":"start","pid":P,"reader_tid":T,"writer_tid":T,
 *                "reader_cpu":N,"writer_cpu":N,"page_size":4096,
 *                "R":[start,end],"W":[...],"S":[...],"I":[...]}
 *     With --spawn-late the threads are created 0.5 s after this line; the
 *     tids in it are then -1 and a second line follows once they run:
 *                {"event":"threads","reader_tid":T,"writer_tid":T}
 *   end line:   {"event":"end","passes_r":N,"passes_w":N,"intact":true|false}
 *
 * Runs until --duration seconds (float, default 10) have passed or SIGTERM /
 * SIGINT arrives, then verifies every buffer (R and I keep their initial
 * pattern; W and S hold the writer's last complete pass) and exits 0 when
 * intact, 3 when corrupted, 2 on bad usage, 1 on a system error.
 * --pause-us N makes each thread sleep N µs between passes (default 0).
 * --flush-tlb makes each thread flush its CPU's TLB after every pass (it touches
 * 64 spare pages of its own and drops them with MADV_DONTNEED, which the kernel
 * turns into a full flush of this mm on every CPU that runs it): under QEMU's TCG
 * a translation stays cached until the guest flushes, so a thread alone on its
 * CPU would never set a page's accessed bit again once the kernel's DAMON cleared
 * it; a real CPU's TLB is far too small to hold these buffers.  It does not touch
 * R, W, S or I.
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

static size_t buf_size;
static uint64_t *R, *W, *S, *I;
static int reader_cpu = 0, writer_cpu = 1;
static long pause_us = 0;
static int flush_tlb = 0;
static char *spare; /* 2 x SPARE_PAGES pages: the reader's, then the writer's */
#define SPARE_PAGES 64
static atomic_int stop_flag;
static atomic_int reader_tid = -1, writer_tid = -1;
static uint64_t passes_r, passes_w;
static volatile sig_atomic_t got_signal;

static uint64_t init_val(int buf, size_t i) { return ((uint64_t)buf << 56) ^ (i * 0x9E3779B97F4A7C15ull); }
static uint64_t write_val(uint64_t pass, size_t i) { return (pass << 40) ^ (i * 0xC2B2AE3D27D4EB4Full) ^ 1; }

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0) {
		fprintf(stderr, "access_pattern: sched_setaffinity(cpu %d): %s\n", cpu, strerror(errno));
		exit(1);
	}
}

static void maybe_flush(int who)
{
	if (!flush_tlb)
		return;
	long pg = sysconf(_SC_PAGESIZE);
	char *mine = spare + (size_t)who * SPARE_PAGES * pg;
	for (int i = 0; i < SPARE_PAGES; i++)
		((volatile char *)mine)[(size_t)i * pg] = 1;
	madvise(mine, (size_t)SPARE_PAGES * pg, MADV_DONTNEED);
}

static void maybe_pause(void)
{
	if (pause_us > 0) {
		struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
		nanosleep(&ts, NULL);
	}
}

static void *reader(void *arg)
{
	(void)arg;
	pin(reader_cpu);
	atomic_store(&reader_tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t), step = LINE / sizeof(uint64_t);
	uint64_t sum = 0;
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		for (size_t i = 0; i < words; i += step)
			sum += ((volatile uint64_t *)R)[i];
		for (size_t i = 0; i < words; i += step)
			sum += ((volatile uint64_t *)S)[i];
		passes_r++;
		maybe_flush(0);
		maybe_pause();
	}
	return (void *)(uintptr_t)sum;
}

static void *writer(void *arg)
{
	(void)arg;
	pin(writer_cpu);
	atomic_store(&writer_tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t), step = LINE / sizeof(uint64_t);
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		uint64_t pass = passes_w + 1;
		for (size_t i = 0; i < words; i += step)
			((volatile uint64_t *)W)[i] = write_val(pass, i);
		for (size_t i = 0; i < words; i += step)
			((volatile uint64_t *)S)[i] = write_val(pass, i) ^ 2;
		passes_w = pass;
		maybe_flush(1);
		maybe_pause();
	}
	return NULL;
}

static uint64_t *alloc_buf(int thp)
{
	void *p = mmap(NULL, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		fprintf(stderr, "access_pattern: mmap %zu bytes: %s\n", buf_size, strerror(errno));
		exit(1);
	}
	madvise(p, buf_size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return p;
}

static void on_signal(int sig)
{
	(void)sig;
	got_signal = 1;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double deadline)
{
	while (!got_signal) {
		double left = deadline - now_s();
		if (left <= 0)
			break;
		if (left > 0.01)
			left = 0.01;
		struct timespec ts = {0, (long)(left * 1e9)};
		nanosleep(&ts, NULL);
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: access_pattern [--duration S] [--size MiB] [--reader-cpu N] "
			"[--writer-cpu N] [--spawn-late] [--pause-us N] [--thp] [--flush-tlb]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	double duration = 10.0;
	long size_mib = 16;
	int spawn_late = 0, thp = 0;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--spawn-late")) { spawn_late = 1; continue; }
		if (!strcmp(a, "--thp")) { thp = 1; continue; }
		if (!strcmp(a, "--flush-tlb")) { flush_tlb = 1; continue; }
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		char *end;
		if (!strcmp(a, "--duration")) duration = strtod(v, &end);
		else if (!strcmp(a, "--size")) size_mib = strtol(v, &end, 10);
		else if (!strcmp(a, "--reader-cpu")) reader_cpu = (int)strtol(v, &end, 10);
		else if (!strcmp(a, "--writer-cpu")) writer_cpu = (int)strtol(v, &end, 10);
		else if (!strcmp(a, "--pause-us")) pause_us = strtol(v, &end, 10);
		else usage();
		if (*end || end == v)
			usage();
	}
	if (size_mib <= 0 || duration < 0 || reader_cpu < 0 || writer_cpu < 0 || pause_us < 0)
		usage();
	buf_size = (size_t)size_mib << 20;

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	/* Only the main thread takes the signals. */

	double t0 = now_s();
	R = alloc_buf(thp); W = alloc_buf(thp); S = alloc_buf(thp); I = alloc_buf(thp);
	if (flush_tlb) {
		spare = mmap(NULL, 2 * SPARE_PAGES * (size_t)sysconf(_SC_PAGESIZE),
			     PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (spare == MAP_FAILED) {
			fprintf(stderr, "access_pattern: mmap: %s\n", strerror(errno));
			return 1;
		}
	}
	size_t words = buf_size / sizeof(uint64_t);
	for (size_t i = 0; i < words; i++) {
		R[i] = init_val(1, i);
		W[i] = 0;
		S[i] = 0;
		I[i] = init_val(4, i);
	}

	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);

	pthread_t tr, tw;
	if (!spawn_late) {
		pthread_sigmask(SIG_BLOCK, &block, &old);
		pthread_create(&tr, NULL, reader, NULL);
		pthread_create(&tw, NULL, writer, NULL);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		while (atomic_load(&reader_tid) < 0 || atomic_load(&writer_tid) < 0)
			sched_yield();
	}
	printf("{\"event\":\"start\",\"pid\":%d,\"reader_tid\":%d,\"writer_tid\":%d,"
	       "\"reader_cpu\":%d,\"writer_cpu\":%d,\"page_size\":%ld,"
	       "\"R\":[%lu,%lu],\"W\":[%lu,%lu],\"S\":[%lu,%lu],\"I\":[%lu,%lu]}\n",
	       (int)getpid(), atomic_load(&reader_tid), atomic_load(&writer_tid), reader_cpu,
	       writer_cpu, sysconf(_SC_PAGESIZE),
	       (unsigned long)R, (unsigned long)R + buf_size, (unsigned long)W,
	       (unsigned long)W + buf_size, (unsigned long)S, (unsigned long)S + buf_size,
	       (unsigned long)I, (unsigned long)I + buf_size);
	fflush(stdout);

	if (spawn_late) {
		sleep_until(now_s() + 0.5);
		pthread_sigmask(SIG_BLOCK, &block, &old);
		pthread_create(&tr, NULL, reader, NULL);
		pthread_create(&tw, NULL, writer, NULL);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		while (atomic_load(&reader_tid) < 0 || atomic_load(&writer_tid) < 0)
			sched_yield();
		printf("{\"event\":\"threads\",\"reader_tid\":%d,\"writer_tid\":%d}\n",
		       atomic_load(&reader_tid), atomic_load(&writer_tid));
		fflush(stdout);
	}

	sleep_until(t0 + duration);
	atomic_store(&stop_flag, 1);
	pthread_join(tr, NULL);
	pthread_join(tw, NULL);

	int intact = 1;
	size_t step = LINE / sizeof(uint64_t);
	for (size_t i = 0; i < words && intact; i++) {
		int line_word = (i % step) == 0;
		uint64_t w_exp = line_word && passes_w ? write_val(passes_w, i) : 0;
		uint64_t s_exp = line_word && passes_w ? write_val(passes_w, i) ^ 2 : 0;
		if (R[i] != init_val(1, i) || I[i] != init_val(4, i) || W[i] != w_exp || S[i] != s_exp)
			intact = 0;
	}
	printf("{\"event\":\"end\",\"passes_r\":%lu,\"passes_w\":%lu,\"intact\":%s}\n",
	       (unsigned long)passes_r, (unsigned long)passes_w, intact ? "true" : "false");
	fflush(stdout);
	return intact ? 0 : 3;
}
