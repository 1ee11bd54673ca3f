/* A known dirtying rate, with its own ground truth: the dirty-rate tests' workload.
 *
 *   dirtier [--mib N] [--rate PAGES_PER_S] [--window-ms MS] [--tick-ms MS] [--seed S]
 *           [--seconds T]
 *
 * Maps N MiB (default 128) of anonymous memory, writes every page once (so the
 * buffer is resident, as a VM's working memory is), prints one JSON line with the
 * buffer's address, then writes RATE random pages per second (uniformly over the
 * buffer, in a burst every tick, default 1 ms) and, at the end of every window
 * (default 1 s), prints
 *
 *   {"window": I, "t": SECONDS, "writes": W, "distinct": D, "own": O}
 *
 * where D is the number of distinct buffer pages it wrote in that window -- the
 * quantity a dirty rate estimates (QEMU: pages dirtied in the measuring period)
 * -- and O the pages of its own bookkeeping it wrote meanwhile (version bytes,
 * the window's bitmap, counters and stack: D + O is all it dirtied).  --rate -1
 * writes as fast as it can (the benchmarks' throughput: writes per window).  A write
 * bumps the page's version: word 0 holds the version, word 1 a hash of page and
 * version (the dirtier keeps the version's low byte), so the content changes (QEMU's page-sampling mode sees a change of
 * content) and can be checked: on SIGUSR1 it compares every page with what it
 * wrote and prints {"bad_pages": N, "ok": true|false}, the test's proof that the
 * data survived.
 *
 * Run as PID 1 (the init of a tiny QEMU guest, tests/dirty_vm.py) it takes its
 * options from the kernel command line's environment (dirtier_mib=, dirtier_rate=,
 * dirtier_window_ms=, dirtier_tick_ms=, dirtier_seed=), writes to /dev/console and powers off after
 * dirtier_seconds (default: never).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static volatile sig_atomic_t check_req;

static void on_usr1(int sig) { (void)sig; check_req = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t rng = 88172645463325252ULL;

static uint64_t xorshift(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t mix(uint64_t p, uint64_t v)
{
    uint64_t x = p * 0x9E3779B97F4A7C15ULL ^ v * 0xC2B2AE3D27D4EB4FULL;
    x ^= x >> 31;
    return x * 0x94D049BB133111EBULL;
}

static long opt(int argc, char **argv, const char *flag, const char *env, long dflt)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], flag))
            return strtol(argv[i + 1], NULL, 0);
    const char *e = getenv(env);
    return e ? strtol(e, NULL, 0) : dflt;
}

int main(int argc, char **argv)
{
    int init = getpid() == 1;
    if (init) {
        int fd = open("/dev/console", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
    }
    long mib = opt(argc, argv, "--mib", "dirtier_mib", 128);
    long rate = opt(argc, argv, "--rate", "dirtier_rate", 1000);
    long window_ms = opt(argc, argv, "--window-ms", "dirtier_window_ms", 1000);
    long tick_ms = opt(argc, argv, "--tick-ms", "dirtier_tick_ms", 1);
    long seed = opt(argc, argv, "--seed", "dirtier_seed", 1);
    long seconds = opt(argc, argv, "--seconds", "dirtier_seconds", 0);
    if (mib <= 0 || rate < -1 || window_ms <= 0 || tick_ms <= 0 || tick_ms > window_ms) {
        fprintf(stderr, "dirtier: bad options\n");
        return 2;
    }
    rng ^= (uint64_t)seed * 0x9E3779B97F4A7C15ULL;
    size_t npages = (size_t)mib * 1024 * 1024 / PAGE;
    size_t len = npages * PAGE;
    uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* bookkeeping kept small, it is dirtied too: a byte per page and a bit per page */
    uint8_t *version = calloc(npages, 1);          /* low byte of each page's version */
    uint8_t *seen = calloc((npages + 7) / 8, 1);   /* pages written in this window */
    size_t vpages = (npages + PAGE - 1) / PAGE;
    uint8_t *vseen = calloc(vpages, 1);            /* version pages written in this window */
    if (buf == MAP_FAILED || !version || !seen || !vseen) {
        fprintf(stderr, "dirtier: out of memory\n");
        return 1;
    }
    for (size_t p = 0; p < npages; p++) {  /* resident, each page with its own content */
        version[p] = 1;
        buf[p * (PAGE / 8)] = 1;
        buf[p * (PAGE / 8) + 1] = mix(p, 1);
    }
    signal(SIGUSR1, on_usr1);
    printf("{\"addr\": %lu, \"len\": %zu, \"pages\": %zu, \"rate\": %ld, \"window_ms\": %ld, "
           "\"pid\": %d}\n", (unsigned long)buf, len, npages, rate, window_ms, getpid());
    fflush(stdout);

    uint64_t window_ns = (uint64_t)window_ms * 1000000ULL;
    uint64_t t0 = now_ns(), done = 0, wstart = t0;
    uint32_t window = 0;
    uint64_t writes = 0, distinct = 0, vdistinct = 0;
    for (;;) {
        uint64_t t = now_ns();
        /* pages due by now: rate * elapsed, written in one burst every millisecond */
        uint64_t due = rate < 0 ? done + 4096 : (uint64_t)((double)rate * (double)(t - t0) / 1e9);
        while (done < due) {
            size_t p = (size_t)(xorshift() % npages);
            uint64_t v = buf[p * (PAGE / 8)] + 1;
            version[p] = (uint8_t)v;
            buf[p * (PAGE / 8)] = v;
            buf[p * (PAGE / 8) + 1] = mix(p, v);
            writes++;
            if (!(seen[p / 8] & (1u << (p % 8)))) {
                seen[p / 8] |= (uint8_t)(1u << (p % 8));
                distinct++;
            }
            if (!vseen[p / PAGE]) {
                vseen[p / PAGE] = 1;
                vdistinct++;
            }
            done++;
        }
        if (t - wstart >= window_ns) {
            /* own pages: the version pages written, the bitmap's pages, and one page
             * each for the counters and the stack */
            uint64_t own = vdistinct + ((npages + 7) / 8 + PAGE - 1) / PAGE + 2;
            printf("{\"window\": %u, \"t\": %.3f, \"writes\": %lu, \"distinct\": %lu, "
                   "\"own\": %lu}\n", window, (double)(t - t0) / 1e9, (unsigned long)writes,
                   (unsigned long)distinct, (unsigned long)own);
            fflush(stdout);
            window++;
            writes = distinct = vdistinct = 0;
            memset(seen, 0, (npages + 7) / 8);
            memset(vseen, 0, vpages);
            wstart += window_ns;
            if (seconds > 0 && t - t0 >= (uint64_t)seconds * 1000000000ULL) {
                if (init) {
                    sync();
                    reboot(RB_POWER_OFF);
                }
                return 0;
            }
        }
        if (check_req) {
            check_req = 0;
            /* every page must hold what was written last, and zeros elsewhere */
            size_t bad = 0;
            for (size_t p = 0; p < npages; p++) {
                const uint64_t *w = buf + p * (PAGE / 8);
                int ok = (uint8_t)w[0] == version[p] && w[1] == mix(p, w[0]);
                for (size_t i = 2; ok && i < PAGE / 8; i++)
                    ok = w[i] == 0;
                bad += !ok;
            }
            printf("{\"bad_pages\": %zu, \"ok\": %s}\n", bad, bad ? "false" : "true");
            fflush(stdout);
        }
        if (rate >= 0) {
            struct timespec ts = {tick_ms / 1000, (tick_ms % 1000) * 1000000};
            nanosleep(&ts, NULL);
        }
    }
}
