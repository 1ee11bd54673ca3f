/*
 * wp_torture: small target programs for the syscall-injection and wp tests.
 *
 *   wp_torture spin N        LCG chain of N steps kept in registers; prints
 *                            {"result":R} (compare with an undisturbed run).
 *   wp_torture sleep MS      one nanosleep(MS); prints {"rc":..,"errno":..,"ms":..}.
 *   wp_torture read          prints {"ready":1}, blocks in read(0, 64 bytes),
 *                            prints {"n":..,"errno":..,"data":"..."}.
 *   wp_torture seccomp S     installs a seccomp filter that kills on userfaultfd,
 *                            prints {"ready":1}, then {"tick":N} every 50 ms
 *                            for S seconds and {"event":"end"}.
 *   wp_torture write S MIB CPU
 *                            one thread pinned to CPU stores one word per 64-byte
 *                            line over a MIB MiB anonymous buffer for S seconds;
 *                            prints {"event":"start","pid":P,"buf":[lo,hi]} and at
 *                            the end {"event":"end","passes":N,"rate":N/S,"intact":B}.
 *   wp_torture churn S [--exec]
 *                            for S seconds: writes a main 8 MiB buffer, mmaps /
 *                            writes / munmaps scratch buffers, mremaps (grow and
 *                            move), MADV_DONTNEEDs and checks for zeros, forks a
 *                            child that writes its copy and exits; every ~50 ms
 *                            prints {"tick":N}.  With --exec it execs itself
 *                            ("churn S2") halfway.  Verifies the main buffer and
 *                            every remapped buffer; exits 0 when all intact, 3
 *                            otherwise.  The start line is
 *                            {"event":"start","pid":P,"main":[lo,hi]}.
 *   wp_torture remap S [KIB] for S seconds: mmap 1-3 x KIB (default 1024) KiB, touch, mremap-grow it
 *                            (MAYMOVE), munmap; prints {"event":"end","rounds":N,
 *                            "failures":F,"errno":E}; exits 3 when any mremap failed.
 *   wp_torture vfork MS      a spinning thread; the main thread vforks a child that
 *                            sleeps MS ms (the parent cannot be ptrace-stopped then).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int bad;
#define CHECK(c) do { if (!(c)) { fprintf(stderr, "wp_torture: check failed: %s (line %d, errno %d)\n", #c, __LINE__, errno); bad = 1; } } while (0)

static void fill(uint64_t *p, size_t words, uint64_t seed)
{
	for (size_t i = 0; i < words; i += 8)
		p[i] = seed ^ (i * 0x9E3779B97F4A7C15ull);
}

static int verify(const uint64_t *p, size_t words, uint64_t seed)
{
	for (size_t i = 0; i < words; i += 8)
		if (p[i] != (seed ^ (i * 0x9E3779B97F4A7C15ull)))
			return 0;
	return 1;
}

static int churn(char *self, double secs, int do_exec)
{
	const size_t MB = 1 << 20, msz = 8 * MB;
	uint64_t *m = mmap(NULL, msz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	madvise(m, msz, MADV_NOHUGEPAGE);
	uint64_t seed = 1;
	fill(m, msz / 8, seed);
	printf("{\"event\":\"start\",\"pid\":%d,\"main\":[%lu,%lu]}\n", (int)getpid(),
	       (unsigned long)m, (unsigned long)m + msz);
	fflush(stdout);
	double t0 = now_ms(), next_tick = t0;
	long tick = 0, round = 0;
	while (now_ms() - t0 < secs * 1e3) {
		round++;
		CHECK(verify(m, msz / 8, seed));
		seed++;
		fill(m, msz / 8, seed);
		/* scratch mmap / write / munmap */
		uint64_t *s = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(s != MAP_FAILED);
		fill(s, 2 * MB / 8, seed * 7);
		CHECK(verify(s, 2 * MB / 8, seed * 7));
		/* mremap grow + move, contents must follow */
		uint64_t *r = mremap(s, 2 * MB, 4 * MB, MREMAP_MAYMOVE);
		CHECK(r != MAP_FAILED);
		if (r == MAP_FAILED)
			break;
		CHECK(verify(r, 2 * MB / 8, seed * 7));
		fill(r, 4 * MB / 8, seed * 11);
		/* MADV_DONTNEED on half: zeros there, data kept in the rest */
		CHECK(madvise(r, 2 * MB, MADV_DONTNEED) == 0);
		for (size_t i = 0; i < 2 * MB / 8; i += 512)
			CHECK(r[i] == 0);
		for (size_t i = 2 * MB / 8; i < 4 * MB / 8; i += 8)
			CHECK(r[i] == ((seed * 11) ^ (i * 0x9E3779B97F4A7C15ull)));
		fill(r, 2 * MB / 8, seed * 13);
		CHECK(verify(r, 2 * MB / 8, seed * 13));
		munmap(r, 4 * MB);
		/* partial munmap of a fresh mapping */
		uint64_t *u = mmap(NULL, 1 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(u != MAP_FAILED);
		fill(u, MB / 8, 5);
		munmap((char *)u + MB / 2, MB / 2);
		CHECK(verify(u, MB / 16, 5));
		munmap(u, MB / 2);
		/* fork every 4th round: the child writes its copy, parent's stays */
		if (round % 4 == 0) {
			pid_t c = fork();
			if (c == 0) {
				int ok = verify(m, msz / 8, seed);
				fill(m, msz / 8, seed + 1000);
				ok &= verify(m, msz / 8, seed + 1000);
				_exit(ok ? 0 : 3);
			}
			int st = 0;
			CHECK(c > 0 && waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0);
			CHECK(verify(m, msz / 8, seed));
		}
		if (now_ms() >= next_tick) {
			printf("{\"tick\":%ld}\n", tick++);
			fflush(stdout);
			next_tick += 50;
		}
		if (do_exec && now_ms() - t0 > secs * 500) {
			char arg[32];
			snprintf(arg, sizeof(arg), "%g", secs / 2);
			if (bad)
				return 3;
			printf("{\"event\":\"exec\"}\n");
			fflush(stdout);
			execl(self, self, "churn", arg, (char *)NULL);
			return 1;
		}
	}
	CHECK(verify(m, msz / 8, seed));
	printf("{\"event\":\"end\",\"rounds\":%ld,\"intact\":%s}\n", round, bad ? "false" : "true");
	fflush(stdout);
	return bad ? 3 : 0;
}

/* Tight mmap / touch / mremap-grow / munmap loop: any mremap failure counts. */
static int remap(double secs, size_t unit)
{
	long rounds = 0, failures = 0, last_errno = 0;
	printf("{\"event\":\"start\",\"pid\":%d}\n", (int)getpid());
	fflush(stdout);
	double t0 = now_ms();
	while (now_ms() - t0 < secs * 1e3) {
		size_t sz = (1 + rounds % 3) * unit;
		char *s = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (s == MAP_FAILED)
			return 1;
		for (size_t i = 0; i < sz; i += 4096)
			s[i] = 1;
		char *r = mremap(s, sz, 2 * sz, MREMAP_MAYMOVE);
		if (r == MAP_FAILED) {
			failures++;
			last_errno = errno;
			munmap(s, sz);
		} else {
			munmap(r, 2 * sz);
		}
		rounds++;
	}
	printf("{\"event\":\"end\",\"rounds\":%ld,\"failures\":%ld,\"errno\":%ld}\n",
	       rounds, failures, last_errno);
	return failures ? 3 : 0;
}

static void *spinner(void *arg)
{
	volatile unsigned long *n = arg;
	for (;;)
		(*n)++;
	return NULL;
}

/* A spinning thread, and the main thread blocked in vfork() for MS ms while
 * the child sleeps: a thread that a ptrace interrupt cannot stop meanwhile. */
static int vfork_wait(long ms)
{
	static volatile unsigned long n;
	pthread_t th;
	if (pthread_create(&th, NULL, spinner, (void *)&n))
		return 1;
	printf("{\"event\":\"start\",\"pid\":%d}\n", (int)getpid());
	fflush(stdout);
	usleep(100 * 1000);
	pid_t c = vfork();
	if (c == 0) {
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
		nanosleep(&ts, NULL);
		_exit(0);
	}
	int st = 0;
	waitpid(c, &st, 0);
	printf("{\"event\":\"end\",\"spins\":%lu}\n", n);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "spin")) {
		unsigned long n = strtoul(argv[2], NULL, 10);
		register uint64_t a = 1, b = 2, c = 3, d = 4;
		for (unsigned long i = 0; i < n; i++) {
			a = a * 6364136223846793005ull + 1442695040888963407ull;
			b ^= a >> 17;
			c += b * 31;
			d = (d << 7 | d >> 57) ^ c;
			__asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d));
		}
		printf("{\"result\":%lu}\n", (unsigned long)(a ^ b ^ c ^ d));
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "sleep")) {
		long ms = strtol(argv[2], NULL, 10);
		struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
		printf("{\"ready\":1}\n");
		fflush(stdout);
		double t0 = now_ms();
		int rc = nanosleep(&ts, NULL);
		int e = rc ? errno : 0;
		printf("{\"rc\":%d,\"errno\":%d,\"ms\":%.1f}\n", rc, e, now_ms() - t0);
		return 0;
	}
	if (argc >= 2 && !strcmp(argv[1], "read")) {
		char buf[65] = {0};
		printf("{\"ready\":1}\n");
		fflush(stdout);
		ssize_t n = read(0, buf, 64);
		int e = n < 0 ? errno : 0;
		for (char *p = buf; *p; p++)
			if (*p == '"' || *p == '\\' || *p < ' ')
				*p = '_';
		printf("{\"n\":%zd,\"errno\":%d,\"data\":\"%s\"}\n", n, e, n > 0 ? buf : "");
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "seccomp")) {
		struct sock_filter f[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
			perror("wp_torture: seccomp");
			return 1;
		}
		printf("{\"ready\":1}\n");
		fflush(stdout);
		double t0 = now_ms();
		for (long tick = 0; now_ms() - t0 < strtod(argv[2], NULL) * 1e3; tick++) {
			struct timespec ts = {0, 50000000L};
			nanosleep(&ts, NULL);
			printf("{\"tick\":%ld}\n", tick);
			fflush(stdout);
		}
		printf("{\"event\":\"end\"}\n");
		return 0;
	}
	if (argc >= 5 && !strcmp(argv[1], "write")) {
		double secs = strtod(argv[2], NULL);
		size_t sz = (size_t)strtol(argv[3], NULL, 10) << 20, words = sz / 8;
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(atoi(argv[4]), &set);
		if (sched_setaffinity(0, sizeof(set), &set)) {
			perror("wp_torture: sched_setaffinity");
			return 1;
		}
		uint64_t *b = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (b == MAP_FAILED)
			return 1;
		madvise(b, sz, MADV_NOHUGEPAGE);
		fill(b, words, 0);
		printf("{\"event\":\"start\",\"pid\":%d,\"buf\":[%lu,%lu]}\n", (int)getpid(),
		       (unsigned long)b, (unsigned long)b + sz);
		fflush(stdout);
		double t0 = now_ms();
		uint64_t pass = 0;
		while (now_ms() - t0 < secs * 1e3) {
			pass++;
			fill(b, words, pass);
		}
		double el = (now_ms() - t0) / 1e3;
		printf("{\"event\":\"end\",\"passes\":%lu,\"rate\":%.3f,\"intact\":%s}\n",
		       (unsigned long)pass, pass / el, verify(b, words, pass) ? "true" : "false");
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "vfork"))
		return vfork_wait(strtol(argv[2], NULL, 10));
	if (argc >= 3 && !strcmp(argv[1], "remap"))
		return remap(strtod(argv[2], NULL), (argc >= 4 ? strtoul(argv[3], NULL, 10) : 1024) << 10);
	if (argc >= 3 && !strcmp(argv[1], "churn"))
		return churn(argv[0], strtod(argv[2], NULL), argc >= 4 && !strcmp(argv[3], "--exec"));
	fprintf(stderr, "usage: wp_torture spin N | sleep MS | read | seccomp S | write S MIB CPU | churn S [--exec] | remap S [KIB] | vfork MS\n");
	return 2;
}
