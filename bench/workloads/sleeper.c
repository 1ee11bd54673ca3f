/* The floor of any sleep-per-turn loop on this machine: N turns of ppoll(period) and
 * nothing else, then one JSON line with the CPU the process used per turn.
 *
 *     sleeper TURNS PERIOD_US
 *
 * bench_loop.py runs it beside the controlled loop: whatever a turn of udamon's C loop
 * costs above this is its own work; what this costs is the kernel's sleep and wake-up
 * (timer, scheduler, the mitigations' return paths), which no monitor that sleeps
 * between turns can avoid. */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static double now_s(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: sleeper TURNS PERIOD_US\n");
        return 2;
    }
    long turns = atol(argv[1]), period_us = atol(argv[2]);
    if (turns <= 0 || period_us <= 0) {
        fprintf(stderr, "sleeper: TURNS and PERIOD_US must be positive\n");
        return 2;
    }
    struct timespec ts = {period_us / 1000000, (period_us % 1000000) * 1000};
    double w0 = now_s(CLOCK_MONOTONIC), c0 = now_s(CLOCK_PROCESS_CPUTIME_ID);
    for (long i = 0; i < turns; i++)
        ppoll(NULL, 0, &ts, NULL);
    double w1 = now_s(CLOCK_MONOTONIC), c1 = now_s(CLOCK_PROCESS_CPUTIME_ID);
    printf("{\"turns\": %ld, \"period_us\": %ld, \"wall_s\": %.6f, \"cpu_s\": %.6f, "
           "\"cpu_us_per_turn\": %.3f}\n", turns, period_us, w1 - w0, c1 - c0,
           (c1 - c0) / turns * 1e6);
    return 0;
}
