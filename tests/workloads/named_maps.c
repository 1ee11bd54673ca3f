/*
 * named_maps: a workload whose memory and threads have known names.
 *
 * Buffers of --size MiB (default 8) each, every one a different kind of mapping:
 *   F  a shared mapping of the file --file PATH (created, truncated to size)
 *   M  a shared mapping of memfd_create("udamon_memfd")      -> memfd:udamon_memfd
 *   N  anonymous memory named with prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME,
 *      "udamon_anon") (Linux >= 5.17, CONFIG_ANON_VMA_NAME)  -> [anon:udamon_anon]
 *      ("anon_name": false and "anon_name_error" in the start line when refused)
 *   A  anonymous memory without a name                       -> [anon]
 *   H  the heap, grown with sbrk()                           -> [heap]
 * Threads: "nm_reader" (named with pthread_setname_np) reads every buffer,
 * "nm_writer" (named itself with prctl(PR_SET_NAME)) writes every buffer; the
 * main thread keeps the program's name.  With --churn a third kind of thread
 * is started every 20 ms and ends at once: it names itself "nm_short", writes
 * A once and exits (udamon sees such threads only by their tid, or not at all).
 *
 * stdout, one JSON object per line, flushed:
 *   {"event":"start","pid":P,"reader_tid":T,"writer_tid":T,"file":PATH,
 *    "F":[start,end],"M":[...],"N":[...],"A":[...],"H":[...],"stack":ADDR,
 *    "anon_name":true|false[,"anon_name_error":"..."]}
 *   {"event":"end","passes_r":N,"passes_w":N,"short_threads":N,"intact":true|false}
 * Runs --duration seconds (default 10) or until SIGTERM/SIGINT, then checks that
 * every buffer holds the writer's last pass: exit 0 intact, 3 corrupted, 2 bad
 * usage, 1 system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#endif
#ifndef PR_SET_VMA_ANON_NAME
#define PR_SET_VMA_ANON_NAME 0
#endif

#define LINE 64
#define NBUF 5

static size_t buf_size;
static uint64_t *buf[NBUF]; /* F M N A H */
static const char *names[NBUF] = {"F", "M", "N", "A", "H"};
static atomic_int stop_flag;
static atomic_int reader_tid = -1, writer_tid = -1;
static uint64_t passes_r, passes_w;
static atomic_long short_threads;
static volatile sig_atomic_t got_signal;

static uint64_t write_val(uint64_t pass, int b, size_t i)
{
	return (pass << 40) ^ ((uint64_t)b << 32) ^ (i * 0x9E3779B97F4A7C15ull) ^ 1;
}

static void die(const char *what)
{
	fprintf(stderr, "named_maps: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *reader(void *arg)
{
	(void)arg;
	atomic_store(&reader_tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t), step = LINE / sizeof(uint64_t);
	uint64_t sum = 0;
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		for (int b = 0; b < NBUF; b++)
			for (size_t i = 0; i < words; i += step)
				sum += ((volatile uint64_t *)buf[b])[i];
		passes_r++;
	}
	return (void *)(uintptr_t)sum;
}

static void *writer(void *arg)
{
	(void)arg;
	prctl(PR_SET_NAME, "nm_writer", 0, 0, 0);
	atomic_store(&writer_tid, (int)syscall(SYS_gettid));
	size_t words = buf_size / sizeof(uint64_t);
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		uint64_t pass = passes_w + 1;
		for (int b = 0; b < NBUF; b++)
			for (size_t i = 0; i < words; i++)
				((volatile uint64_t *)buf[b])[i] = write_val(pass, b, i);
		passes_w = pass;
	}
	return NULL;
}

static void *short_lived(void *arg)
{
	(void)arg;
	prctl(PR_SET_NAME, "nm_short", 0, 0, 0);
	/* touch A without changing it: read and write back the same value */
	size_t words = buf_size / sizeof(uint64_t), step = 4096 / sizeof(uint64_t);
	for (size_t i = 0; i < words; i += step)
		__atomic_fetch_add(&buf[3][i], 0, __ATOMIC_RELAXED);
	atomic_fetch_add(&short_threads, 1);
	return NULL;
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

static void nap(double s)
{
	struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
	nanosleep(&ts, NULL);
}

static void *map_fd(int fd)
{
	if (ftruncate(fd, (off_t)buf_size) != 0)
		die("ftruncate");
	void *p = mmap(NULL, buf_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	close(fd);
	return p;
}

static void *map_anon(void)
{
	void *p = mmap(NULL, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	madvise(p, buf_size, MADV_NOHUGEPAGE);
	return p;
}

int main(int argc, char **argv)
{
	double duration = 10;
	long size_mb = 8;
	const char *file = NULL;
	int churn = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--duration") && i + 1 < argc)
			duration = atof(argv[++i]);
		else if (!strcmp(argv[i], "--size") && i + 1 < argc)
			size_mb = atol(argv[++i]);
		else if (!strcmp(argv[i], "--file") && i + 1 < argc)
			file = argv[++i];
		else if (!strcmp(argv[i], "--churn"))
			churn = 1;
		else {
			fprintf(stderr, "usage: named_maps --file PATH [--duration S] [--size MiB] [--churn]\n");
			return 2;
		}
	}
	if (!file || size_mb <= 0) {
		fprintf(stderr, "named_maps: --file PATH is needed and --size must be positive\n");
		return 2;
	}
	buf_size = (size_t)size_mb << 20;
	int fd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		die("open --file");
	buf[0] = map_fd(fd);
	fd = memfd_create("udamon_memfd", 0);
	if (fd < 0)
		die("memfd_create");
	buf[1] = map_fd(fd);
	buf[2] = map_anon();
	errno = 0;
	int named = prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)buf[2], buf_size,
			  (unsigned long)"udamon_anon") == 0;
	int named_errno = errno;
	buf[3] = map_anon();
	void *brk0 = sbrk(0);
	/* page-align the heap buffer: the first page may hold malloc's data */
	uintptr_t h = ((uintptr_t)brk0 + 4095) & ~(uintptr_t)4095;
	if (sbrk((intptr_t)(h - (uintptr_t)brk0 + buf_size)) == (void *)-1)
		die("sbrk");
	buf[4] = (uint64_t *)h;
	for (int b = 0; b < NBUF; b++)
		for (size_t i = 0; i < buf_size / sizeof(uint64_t); i++)
			buf[b][i] = write_val(0, b, i);

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	pthread_t tr, tw;
	if (pthread_create(&tr, NULL, reader, NULL) || pthread_create(&tw, NULL, writer, NULL))
		die("pthread_create");
	pthread_setname_np(tr, "nm_reader");
	while (atomic_load(&reader_tid) < 0 || atomic_load(&writer_tid) < 0)
		nap(0.001);
	nap(0.01); /* the writer has named itself */
	int here = 0;
	printf("{\"event\":\"start\",\"pid\":%d,\"reader_tid\":%d,\"writer_tid\":%d,"
	       "\"file\":\"%s\",\"stack\":%lu,\"anon_name\":%s",
	       (int)getpid(), atomic_load(&reader_tid), atomic_load(&writer_tid), file,
	       (unsigned long)(uintptr_t)&here, named ? "true" : "false");
	if (!named)
		printf(",\"anon_name_error\":\"%s\"", strerror(named_errno));
	for (int b = 0; b < NBUF; b++)
		printf(",\"%s\":[%lu,%lu]", names[b], (unsigned long)(uintptr_t)buf[b],
		       (unsigned long)(uintptr_t)buf[b] + buf_size);
	printf("}\n");
	fflush(stdout);

	double end = now_s() + duration;
	while (!got_signal && now_s() < end) {
		if (churn) {
			pthread_t t;
			if (pthread_create(&t, NULL, short_lived, NULL) == 0)
				pthread_join(t, NULL);
		}
		nap(0.02);
	}
	atomic_store(&stop_flag, 1);
	pthread_join(tr, NULL);
	pthread_join(tw, NULL);
	int intact = 1;
	for (int b = 0; b < NBUF; b++)
		for (size_t i = 0; i < buf_size / sizeof(uint64_t); i++)
			if (buf[b][i] != write_val(passes_w, b, i))
				intact = 0;
	printf("{\"event\":\"end\",\"passes_r\":%lu,\"passes_w\":%lu,\"short_threads\":%ld,"
	       "\"intact\":%s}\n", (unsigned long)passes_r, (unsigned long)passes_w,
	       atomic_load(&short_threads), intact ? "true" : "false");
	fflush(stdout);
	return intact ? 0 : 3;
}
