/* Duplicate pages that KSM could merge, written at four different paces.
 *
 *   ksm_dup [--mib N] [--copies C] [--hot RATE] [--slow RATE] [--read RATE]
 *           [--mergeable] [--seed S]
 *
 * Maps four regions of N MiB (default 32), each its own mapping, and fills each
 * with N/C MiB of pseudo-random pages repeated C times (default 4: every page has
 * exactly three duplicates, in its own region; the regions' contents differ;
 * --copies 1: no duplicate inside the process, two instances with the same seed
 * hold the same pages).  Then:
 *
 *   region 0 "never": not touched again;
 *   region 1 "hot":   RATE random page writes per second (default 2000);
 *   region 2 "slow":  RATE random page writes per second (default 5);
 *   region 3 "read":  RATE random page reads per second (default 2000), no writes.
 *
 * A write stamps the page's first word with its own version, so a written page's
 * content becomes unique (it loses its duplicates).  --mergeable marks the four
 * regions MADV_MERGEABLE itself (the tests' KSM ground truth, independent of
 * udamon).  Prints one JSON line with the regions, then, on SIGUSR1, compares
 * every page with what it must hold and prints {"bad_pages": N, "ok": ...}.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define NREG 4

static volatile sig_atomic_t check_req;
static void on_usr1(int sig) { (void)sig; check_req = 1; }

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void fill(uint64_t *page, uint64_t seed, int region, size_t base)
{
    uint64_t s = seed * 1000003ULL + (uint64_t)region * 0x100000000ULL + base;
    for (size_t w = 0; w < WORDS; w++)
        page[w] = splitmix(&s);
}

static uint64_t stamp(int region, size_t p, uint32_t version)
{
    return 0x8000000000000000ULL | ((uint64_t)region << 56) | ((uint64_t)p << 24) | version;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static long opt(int argc, char **argv, const char *flag, long dflt)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], flag))
            return strtol(argv[i + 1], NULL, 0);
    return dflt;
}

static int has(int argc, char **argv, const char *flag)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], flag))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    long mib = opt(argc, argv, "--mib", 32);
    long rates[NREG] = {0, opt(argc, argv, "--hot", 2000), opt(argc, argv, "--slow", 5),
                        opt(argc, argv, "--read", 2000)};
    uint64_t seed = (uint64_t)opt(argc, argv, "--seed", 1);
    int mergeable = has(argc, argv, "--mergeable");
    const char *names[NREG] = {"never", "hot", "slow", "read"};
    long copies = opt(argc, argv, "--copies", 4);
    size_t npages = (size_t)mib * 1024 * 1024 / PAGE;
    size_t distinct = copies > 0 ? npages / (size_t)copies : 0;
    if (mib < 1 || distinct == 0) {
        fprintf(stderr, "ksm_dup: bad --mib\n");
        return 2;
    }
    uint64_t *reg[NREG];
    uint32_t *version[NREG];
    for (int r = 0; r < NREG; r++) {
        reg[r] = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
        version[r] = calloc(npages, sizeof(uint32_t));
        if (reg[r] == MAP_FAILED || !version[r]) {
            fprintf(stderr, "ksm_dup: out of memory\n");
            return 1;
        }
        /* no THP: KSM merges 4 KiB pages (a huge page would be split first) */
        madvise(reg[r], npages * PAGE, MADV_NOHUGEPAGE);
        for (size_t p = 0; p < npages; p++)
            fill(reg[r] + p * WORDS, seed, r, p % distinct);
        if (mergeable && madvise(reg[r], npages * PAGE, MADV_MERGEABLE)) {
            perror("ksm_dup: madvise(MADV_MERGEABLE)");
            return 1;
        }
    }
    signal(SIGUSR1, on_usr1);
    printf("{\"pid\": %d, \"page\": %lu, \"pages\": %zu, \"distinct\": %zu, \"regions\": [",
           getpid(), PAGE, npages, distinct);
    for (int r = 0; r < NREG; r++)
        printf("%s{\"name\": \"%s\", \"start\": %lu, \"end\": %lu, \"rate\": %ld}", r ? ", " : "",
               names[r], (unsigned long)reg[r], (unsigned long)(reg[r] + npages * WORDS),
               rates[r]);
    printf("]}\n");
    fflush(stdout);

    uint64_t rng = seed * 0x2545F4914F6CDD1DULL + 1, t0 = now_ns();
    uint64_t done[NREG] = {0};
    volatile uint64_t sink = 0;
    for (;;) {
        double el = (double)(now_ns() - t0) / 1e9;
        for (int r = 1; r < NREG; r++) {
            uint64_t due = (uint64_t)((double)rates[r] * el);
            for (; done[r] < due; done[r]++) {
                size_t p = (size_t)(splitmix(&rng) % npages);
                if (r == 3) {
                    sink += reg[r][p * WORDS + (splitmix(&rng) % WORDS)];
                } else {
                    version[r][p]++;
                    reg[r][p * WORDS] = stamp(r, p, version[r][p]);
                }
            }
        }
        if (check_req) {
            check_req = 0;
            size_t bad = 0;
            uint64_t *expect = malloc(PAGE);
            for (int r = 0; r < NREG; r++)
                for (size_t p = 0; p < npages; p++) {
                    fill(expect, seed, r, p % distinct);
                    if (version[r][p])
                        expect[0] = stamp(r, p, version[r][p]);
                    bad += memcmp(expect, reg[r] + p * WORDS, PAGE) != 0;
                }
            free(expect);
            printf("{\"bad_pages\": %zu, \"ok\": %s}\n", bad, bad ? "false" : "true");
            fflush(stdout);
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}
