/* A bare-metal QEMU guest that dirties a known number of pages per second.
 *
 * The ground truth of the dirty-rate tests (tests/workloads/dirty_vm.py): a Linux
 * guest's own kernel dirties some 150 pages per second of its RAM when idle
 * (timers, per-cpu data, slab; measured with udamon's exact mode), which would
 * swamp a workload of 200 pages per second.  This guest has no kernel: QEMU
 * loads it with -kernel (Multiboot, 32-bit protected mode, flat physical memory,
 * no paging) and the only writes to guest RAM are its own.
 *
 * Kernel command line (Multiboot): "rate=PAGES_PER_S mib=N seed=S check=W".  It
 * writes every page of a MIB buffer at 16 MiB once (resident on the host), then
 * RATE random pages per second, paced by the PIT at 1 kHz (the CPU halts in
 * between) and timed by the TSC, and prints on COM1 at the end of every 1 s
 * window
 *
 *   {"window": I, "ms": M, "writes": W, "distinct": D, "own": O}
 *
 * D: distinct buffer pages written in the window; O: pages of its own it wrote
 * meanwhile (the version bytes' pages, the window bitmap, its stack and
 * counters).  D + O is everything the guest dirtied.  M: the window's real length
 * in ms (TSC): above 1000 when the guest fell behind (its vCPU starved, or a
 * check ran), and then its pages per real second are fewer.  Every CHECK windows it
 * compares each page with what it wrote and prints {"bad_pages": N, "ok": ...}.
 *
 * Build: gcc -m32 -ffreestanding -fno-pic -fno-stack-protector -mgeneral-regs-only
 *        -nostdlib -static -O2 -Wl,-Ttext=0x100000 (see dirty_vm.py).
 */
#include <stdint.h>

#define PAGE 4096u
#define BUF_BASE 0x1000000u
#define MAX_PAGES (1u << 18) /* 1 GiB */

/* the Multiboot header (magic, flags, checksum), first in the image, then the entry */
__asm__(".section .text.boot, \"ax\"\n"
        ".align 4\n"
        ".long 0x1BADB002, 0, -0x1BADB002\n"
        ".globl _start\n"
        "_start:\n"
        "    mov $stack + 8192, %esp\n"
        "    push %ebx\n" /* the Multiboot information */
        "    call run\n"
        "1:  hlt\n"
        "    jmp 1b\n"
        ".text\n");

/* Page-aligned, so that the pages of its own it dirties are known: the version
 * pages written, the bitmap's pages, one page of state and the stack's top page. */
static uint8_t version[MAX_PAGES] __attribute__((aligned(4096))); /* each page's version */
static uint8_t seen[MAX_PAGES / 8] __attribute__((aligned(4096))); /* written this window */
static struct {
    volatile uint32_t ticks;
    uint64_t rng;
    uint8_t vseen[MAX_PAGES / PAGE]; /* version pages written this window */
} st __attribute__((aligned(4096)));
__attribute__((used)) uint8_t stack[8192] __attribute__((aligned(4096)));

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* 64/32 -> 32 division by the CPU (the quotient must fit 32 bits): no libgcc */
static inline uint32_t div64(uint64_t n, uint32_t d)
{
    uint32_t q, r;
    __asm__("divl %4" : "=a"(q), "=d"(r) : "a"((uint32_t)n), "d"((uint32_t)(n >> 32)), "rm"(d));
    return q;
}

static void putc_(char c)
{
    while (!(inb(0x3F8 + 5) & 0x20))
        ;
    outb(0x3F8, (uint8_t)c);
}

static void puts_(const char *s) { while (*s) putc_(*s++); }

static void putu(uint32_t v)
{
    char b[12];
    int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_(b[--i]);
}

static void kv(const char *key, uint32_t v, int last)
{
    puts_("\""); puts_(key); puts_("\": "); putu(v);
    if (!last) puts_(", ");
}

struct interrupt_frame;

__attribute__((interrupt)) static void on_timer(struct interrupt_frame *f)
{
    (void)f;
    st.ticks++;
    outb(0x20, 0x20);
}

__attribute__((interrupt)) static void on_other(struct interrupt_frame *f)
{
    (void)f;
    outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

struct __attribute__((packed)) gate { uint16_t lo, sel; uint8_t zero, type; uint16_t hi; };
static struct gate idt[256];

static void setup_interrupts(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (int i = 0; i < 256; i++) {
        uint32_t h = (uint32_t)(i == 32 ? on_timer : on_other);
        idt[i] = (struct gate){(uint16_t)h, cs, 0, 0x8E, (uint16_t)(h >> 16)};
    }
    struct __attribute__((packed)) { uint16_t limit; uint32_t base; } idtr = {sizeof(idt) - 1, (uint32_t)idt};
    __asm__ volatile("lidt %0" :: "m"(idtr));
    /* PIC: IRQs 0-15 at vectors 32-47, only IRQ0 (the PIT) unmasked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 32); outb(0xA1, 40);
    outb(0x21, 4); outb(0xA1, 2);
    outb(0x21, 1); outb(0xA1, 1);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    /* PIT channel 0, rate generator, 1 kHz */
    uint16_t div = 1193;
    outb(0x43, 0x34); outb(0x40, (uint8_t)div); outb(0x40, (uint8_t)(div >> 8));
    __asm__ volatile("sti");
}

static uint32_t arg(const char *cmd, const char *key, uint32_t dflt)
{
    for (const char *p = cmd; p && *p; p++) {
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && *q == '=' && (p == cmd || p[-1] == ' ')) {
            uint32_t v = 0;
            for (q++; *q >= '0' && *q <= '9'; q++) v = v * 10 + (uint32_t)(*q - '0');
            return v;
        }
    }
    return dflt;
}

static uint32_t next(void)
{
    st.rng ^= st.rng << 13;
    st.rng ^= st.rng >> 7;
    st.rng ^= st.rng << 17;
    return (uint32_t)(st.rng >> 16);
}

/* TSC cycles per millisecond, against PIT channel 2 counting down 50 ms in mode 0
 * and polled through port 0x61 (as Linux's pit_calibrate_tsc): no interrupt
 * involved, so no lost tick can stretch it. */
static uint32_t calibrate_tsc(void)
{
    const uint32_t count = 59659; /* 50 ms at 1193182 Hz */
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xB0);                                  /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, (uint8_t)count);
    outb(0x42, (uint8_t)(count >> 8));
    uint64_t t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    return div64(rdtsc() - t0, 50);
}

static uint32_t mix(uint32_t p, uint32_t v)
{
    uint32_t x = p * 0x9E3779B9u ^ v * 0x85EBCA6Bu;
    x ^= x >> 15;
    return x * 0xC2B2AE35u;
}

__attribute__((used)) void run(uint32_t mbinfo_addr);

__attribute__((used)) void run(uint32_t mbinfo_addr)
{
    const uint32_t *mbi = (const uint32_t *)mbinfo_addr;
    const char *cmd = (mbi[0] & 4) ? (const char *)mbi[4] : "";
    uint32_t rate = arg(cmd, "rate", 1000), mib = arg(cmd, "mib", 128);
    uint32_t seed = arg(cmd, "seed", 1), check = arg(cmd, "check", 0);
    uint32_t npages = mib * (1024 * 1024 / PAGE);
    if (npages > MAX_PAGES || (npages & (npages - 1))) npages = 32768; /* a power of two */
    st.rng = 88172645463325252ull ^ ((uint64_t)seed * 0x9E3779B97F4A7C15ull);
    volatile uint32_t *buf = (volatile uint32_t *)BUF_BASE;
    for (uint32_t p = 0; p < npages; p++) {
        buf[p * (PAGE / 4)] = 1;
        buf[p * (PAGE / 4) + 1] = mix(p, 1);
        version[p] = 1;
    }
    uint32_t tsc_per_ms = calibrate_tsc();
    setup_interrupts();
    puts_("{"); kv("addr", BUF_BASE, 0); kv("pages", npages, 0); kv("rate", rate, 0);
    kv("tsc_khz", tsc_per_ms, 1); puts_("}\n");

    uint64_t w0 = rdtsc(), last_print = w0;
    uint32_t window = 0, done = 0, writes = 0, distinct = 0, vdistinct = 0;
    for (;;) {
        __asm__ volatile("hlt");
        uint32_t ms = div64(rdtsc() - w0, tsc_per_ms);
        uint32_t due = rate * (ms < 1000 ? ms : 1000) / 1000;
        while (done < due) {
            uint32_t p = next() & (npages - 1);
            uint32_t v = buf[p * (PAGE / 4)] + 1;
            buf[p * (PAGE / 4)] = v;
            buf[p * (PAGE / 4) + 1] = mix(p, v);
            version[p] = (uint8_t)v;
            writes++;
            done++;
            if (!(seen[p >> 3] & (1u << (p & 7)))) { seen[p >> 3] |= (uint8_t)(1u << (p & 7)); distinct++; }
            if (!st.vseen[p / PAGE]) { st.vseen[p / PAGE] = 1; vdistinct++; }
        }
        if (ms >= 1000) {
            /* own pages: version pages, the bitmap's pages, state, the stack's top */
            uint32_t own = vdistinct + (npages / 8 + PAGE - 1) / PAGE + 2;
            uint64_t now = rdtsc();
            puts_("{"); kv("window", window, 0); kv("ms", div64(now - last_print, tsc_per_ms), 0);
            kv("writes", writes, 0);
            last_print = now;
            kv("distinct", distinct, 0); kv("own", own, 1); puts_("}\n");
            window++;
            w0 += (uint64_t)tsc_per_ms * 1000;
            done = writes = distinct = vdistinct = 0;
            for (uint32_t i = 0; i < npages / 8; i++) seen[i] = 0;
            for (uint32_t i = 0; i < MAX_PAGES / PAGE; i++) st.vseen[i] = 0;
            if (check && window % check == 0) {
                uint32_t bad = 0;
                for (uint32_t p = 0; p < npages; p++) {
                    volatile uint32_t *w = buf + p * (PAGE / 4);
                    int ok = (uint8_t)w[0] == version[p] && w[1] == mix(p, w[0]);
                    for (uint32_t i = 2; ok && i < PAGE / 4; i++) ok = w[i] == 0;
                    bad += !ok;
                }
                puts_("{"); kv("bad_pages", bad, 0); puts_("\"ok\": ");
                puts_(bad ? "false" : "true"); puts_("}\n");
            }
        }
    }
}
