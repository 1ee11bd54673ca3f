/*
 * threads: N worker threads, each reading and writing its own slice of one
 * shared anonymous buffer (--size MiB in total, populated before start).
 * Thread i is pinned to CPU i % nr_cpus unless --no-pin.  Used by the
 * benchmarks to see how the monitor's cost grows with the thread count.
 *
 * stdout, one JSON line each, flushed:
 *   {"event":"start","pid":P,"threads":N,"tids":[...],"buf":[start,end]}
 *   {"event":"end","passes":N}   (total slice passes of all threads)
 * Runs until --duration seconds (float, default 10) or SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
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

#define MAXT 1024
static atomic_int stop_flag;
static volatile sig_atomic_t got_signal;
static uint64_t *buf;
static size_t slice_words;
static int pin = 1, ncpu = 1;
static atomic_int tids[MAXT];
static uint64_t passes[MAXT];

static void on_signal(int s) { (void)s; got_signal = 1; }

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *worker(void *arg)
{
	long i = (long)arg;
	if (pin) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(i % ncpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	atomic_store(&tids[i], (int)syscall(SYS_gettid));
	volatile uint64_t *p = buf + i * slice_words;
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		for (size_t w = 0; w < slice_words; w += 8)
			p[w] += 1;
		passes[i]++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	double duration = 10.0;
	long nthreads = 1, size_mib = 256;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--no-pin")) { pin = 0; continue; }
		if (i + 1 >= argc) goto usage;
		if (!strcmp(argv[i], "--duration")) duration = atof(argv[++i]);
		else if (!strcmp(argv[i], "--threads")) nthreads = atol(argv[++i]);
		else if (!strcmp(argv[i], "--size")) size_mib = atol(argv[++i]);
		else goto usage;
	}
	if (nthreads < 1 || nthreads > MAXT || size_mib < 1)
		goto usage;
	ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
	size_t size = (size_t)size_mib << 20;
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) { perror("mmap"); return 1; }
	madvise(buf, size, MADV_NOHUGEPAGE);
	memset(buf, 1, size);
	slice_words = size / sizeof(uint64_t) / nthreads;

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);

	pthread_t th[MAXT];
	pthread_sigmask(SIG_BLOCK, &block, &old);
	for (long i = 0; i < nthreads; i++) {
		atomic_store(&tids[i], -1);
		pthread_create(&th[i], NULL, worker, (void *)i);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	for (long i = 0; i < nthreads; i++)
		while (atomic_load(&tids[i]) < 0)
			sched_yield();
	double t0 = now_s();
	printf("{\"event\":\"start\",\"pid\":%d,\"threads\":%ld,\"tids\":[", (int)getpid(), nthreads);
	for (long i = 0; i < nthreads; i++)
		printf("%s%d", i ? "," : "", atomic_load(&tids[i]));
	printf("],\"buf\":[%lu,%lu]}\n", (unsigned long)buf, (unsigned long)buf + size);
	fflush(stdout);
	while (!got_signal && now_s() - t0 < duration) {
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	atomic_store(&stop_flag, 1);
	uint64_t total = 0;
	for (long i = 0; i < nthreads; i++) {
		pthread_join(th[i], NULL);
		total += passes[i];
	}
	printf("{\"event\":\"end\",\"passes\":%lu}\n", (unsigned long)total);
	fflush(stdout);
	return 0;
usage:
	fprintf(stderr, "usage: threads [--threads N] [--size MiB] [--duration S] [--no-pin]\n");
	return 2;
}
