/*
 * faults: make user page faults at a chosen rate, for measuring what each fault costs
 * a fault-based monitor (udamon's hint primitive reads every user page fault of its
 * target from the exceptions:page_fault_user tracepoint).
 *
 *   faults RATE SECONDS     (RATE faults per second; 0: none, just sleep)
 *
 * A 64 MiB anonymous buffer (no THP) is touched page by page; every 1024 pages the
 * pages just touched are dropped with MADV_DONTNEED so that the next touch faults
 * again.  The loop paces itself to RATE in 1 ms steps.  stdout, one JSON line each:
 *   {"event":"start","pid":P}   then at the end   {"event":"end","faults":N}
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: faults RATE SECONDS\n");
		return 2;
	}
	double rate = atof(argv[1]), secs = atof(argv[2]);
	size_t pages = 16384, page = 4096, done = 0, pos = 0;
	char *buf = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 1;
	madvise(buf, pages * page, MADV_NOHUGEPAGE);
	printf("{\"event\":\"start\",\"pid\":%d}\n", getpid());
	fflush(stdout);
	double t0 = now(), end = t0 + secs;
	while (now() < end) {
		if (rate <= 0) {
			usleep(10000);
			continue;
		}
		/* faults due by now */
		size_t due = (size_t)((now() - t0) * rate);
		while (done < due) {
			buf[pos * page] = (char)done;
			done++;
			pos++;
			if (pos % 1024 == 0)
				madvise(buf + (pos - 1024) * page, 1024 * page, MADV_DONTNEED);
			if (pos == pages)
				pos = 0;
		}
		usleep(1000);
	}
	printf("{\"event\":\"end\",\"faults\":%zu}\n", done);
	return 0;
}
