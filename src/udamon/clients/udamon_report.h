/*
 * udamon_report.h - report memory accesses into a running udamon session (C client).
 *
 * Header only, no dependencies beyond libc.  The session listens with
 *
 *     udamon record --primitive external --socket /run/udamon.sock --pid PID -o rec.jsonl
 *
 * and a producer does
 *
 *     struct udamon_reporter r;
 *     if (udamon_reporter_open(&r, "/run/udamon.sock", "my-vmm", 0, 5000) < 0) ...;
 *     udamon_report_access(&r, pid, tid, cpu, addr, 4096, is_write);   // time: now
 *     ...
 *     uint64_t dropped = udamon_reporter_close(&r, 5000);
 *
 * The wire format (docs/report-channel.md, udamon/intake/wire.py): a 64-byte hello,
 * a 16-byte reply from the session ("UDAMONOK" or "UDAMONNO" + reason), then 48-byte
 * little-endian records back to back.  time_ns is CLOCK_MONOTONIC; 0 asks the
 * session to stamp the report on arrival.
 *
 * Never blocks by default: reports are buffered (UDAMON_REPORT_BUFFER records) and
 * sent with MSG_DONTWAIT; when the socket is full the new reports are dropped and
 * counted, and the count is sent to the session in band (a KIND_DROPS record), so the
 * session's record says exactly what was lost.  UDAMON_REPORT_BLOCK waits instead.
 * A session that goes away is not an error for the program: every report after
 * that is counted as dropped (MSG_NOSIGNAL: no SIGPIPE).  Not thread-safe: use one
 * reporter per thread (each is its own producer to the session).
 */
#ifndef UDAMON_REPORT_H
#define UDAMON_REPORT_H

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define UDAMON_WIRE_VERSION 1
#define UDAMON_KIND_REPORT 0
#define UDAMON_KIND_DROPS 1
#define UDAMON_SOURCE_EXTERNAL 0 /* 0 on the wire means "external" */
#define UDAMON_REPORT_BLOCK 1    /* flag: wait for room instead of dropping */
#ifndef UDAMON_REPORT_BUFFER
#define UDAMON_REPORT_BUFFER 4096 /* records buffered before a send */
#endif

/* memory levels (the mem field; udamon.intake.reports.MEM_LEVELS) */
enum { UDAMON_MEM_UNKNOWN, UDAMON_MEM_CACHE, UDAMON_MEM_RAM, UDAMON_MEM_REMOTE_RAM,
       UDAMON_MEM_REMOTE_CACHE, UDAMON_MEM_OTHER };

struct udamon_report_rec {
	uint8_t version; /* UDAMON_WIRE_VERSION */
	uint8_t kind;    /* UDAMON_KIND_REPORT */
	uint8_t write;   /* 0 read, 1 write */
	uint8_t source;  /* udamon SOURCES index; 0 = external */
	uint8_t mem;     /* UDAMON_MEM_* */
	uint8_t reserved[3];
	int64_t time_ns; /* CLOCK_MONOTONIC ns; 0 = on arrival */
	uint64_t addr;   /* virtual address in the target */
	uint64_t size;   /* bytes accessed, >= 1 */
	int32_t pid;     /* target process */
	int32_t tid;     /* thread that accessed, -1 unknown */
	int32_t cpu;     /* CPU that accessed, -1 unknown */
	int32_t node;    /* NUMA node of that CPU, -1: the session derives it */
};
_Static_assert(sizeof(struct udamon_report_rec) == 48, "wire record is 48 bytes");
_Static_assert(offsetof(struct udamon_report_rec, time_ns) == 8, "wire layout");
_Static_assert(offsetof(struct udamon_report_rec, pid) == 32, "wire layout");
_Static_assert(offsetof(struct udamon_report_rec, node) == 44, "wire layout");

struct udamon_hello {
	char magic[8]; /* "UDAMONRP" */
	uint16_t version;
	uint16_t record_size;
	uint32_t flags;
	char name[48];
};
_Static_assert(sizeof(struct udamon_hello) == 64, "hello is 64 bytes");

struct udamon_reporter {
	int fd;
	int flags;
	int gone;          /* the session has gone: everything is dropped */
	size_t len;        /* bytes buffered */
	uint64_t sent;     /* reports taken (sent or buffered) */
	uint64_t dropped;  /* reports dropped (socket full, or session gone) */
	uint64_t notified; /* the drop total last sent to the session */
	uint32_t skip;     /* full: drop this many more before trying the socket again */
	uint32_t backoff;  /* the next skip (doubles while the socket stays full) */
	/* room for two drop notices beyond the reports */
	unsigned char buf[(UDAMON_REPORT_BUFFER + 2) * sizeof(struct udamon_report_rec)];
};

static inline int64_t udamon_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int udamon__wait(int fd, short ev, int timeout_ms)
{
	struct pollfd p = {fd, ev, 0};
	int r;
	do
		r = poll(&p, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	return r;
}

/* Send what the socket takes now (or, blocking, everything); keep the rest.  A
 * partial send keeps the unsent tail: a record is never cut. */
static inline void udamon__push(struct udamon_reporter *r, int block)
{
	size_t off = 0;
	while (off < r->len) {
		ssize_t k = send(r->fd, r->buf + off, r->len - off,
				 MSG_NOSIGNAL | (block ? 0 : MSG_DONTWAIT));
		if (k > 0) {
			off += (size_t)k;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		/* EPIPE, ECONNRESET: the session has gone */
		uint64_t lost = (r->len - off) / sizeof(struct udamon_report_rec);
		r->gone = 1;
		r->sent -= lost < r->sent ? lost : r->sent;
		r->dropped += lost;
		r->len = 0;
		return;
	}
	memmove(r->buf, r->buf + off, r->len - off);
	r->len -= off;
}

static inline void udamon__append(struct udamon_reporter *r, const void *rec)
{
	memcpy(r->buf + r->len, rec, sizeof(struct udamon_report_rec));
	r->len += sizeof(struct udamon_report_rec);
}

static inline void udamon__notice(struct udamon_reporter *r)
{
	struct udamon_report_rec n;
	memset(&n, 0, sizeof(n));
	n.version = UDAMON_WIRE_VERSION;
	n.kind = UDAMON_KIND_DROPS;
	n.addr = r->dropped;
	udamon__append(r, &n);
	r->notified = r->dropped;
}

/* Connect (retrying up to timeout_ms while the session's socket does not exist yet),
 * say hello and wait for the session's answer.  0 on success, -errno on failure
 * (-EACCES: not the session's user nor root; -EPROTO: not a udamon session). */
static inline int udamon_reporter_open(struct udamon_reporter *r, const char *path,
				       const char *name, int flags, int timeout_ms)
{
	struct sockaddr_un sa;
	struct udamon_hello h;
	char reply[16];
	size_t got = 0;
	int64_t deadline = udamon_now_ns() + (int64_t)timeout_ms * 1000000;

	memset(r, 0, offsetof(struct udamon_reporter, buf));
	r->fd = -1;
	r->flags = flags;
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	strcpy(sa.sun_path, path);
	for (;;) {
		r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (r->fd < 0)
			return -errno;
		/* room for what is in flight while the session closes an interval (the
		 * kernel caps it at net.core.wmem_max) */
		int sndbuf = 4 << 20;
		setsockopt(r->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
		if (connect(r->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		int e = errno;
		close(r->fd);
		r->fd = -1;
		if ((e != ENOENT && e != ECONNREFUSED) || udamon_now_ns() > deadline)
			return -e;
		struct timespec ts = {0, 50 * 1000000};
		nanosleep(&ts, NULL);
	}
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, "UDAMONRP", 8);
	h.version = UDAMON_WIRE_VERSION;
	h.record_size = sizeof(struct udamon_report_rec);
	strncpy(h.name, name ? name : "c-client", sizeof(h.name) - 1);
	if (send(r->fd, &h, sizeof(h), MSG_NOSIGNAL) != (ssize_t)sizeof(h))
		goto fail;
	while (got < sizeof(reply)) {
		int left = (int)((deadline - udamon_now_ns()) / 1000000);
		if (udamon__wait(r->fd, POLLIN, left > 0 ? left : 0) <= 0) {
			errno = ETIMEDOUT;
			goto fail;
		}
		ssize_t k = recv(r->fd, reply + got, sizeof(reply) - got, 0);
		if (k <= 0) {
			errno = k == 0 ? EACCES : errno; /* closed at once: refused */
			goto fail;
		}
		got += (size_t)k;
	}
	if (memcmp(reply, "UDAMONOK", 8) != 0) {
		errno = memcmp(reply, "UDAMONNO", 8) == 0 && reply[8] == 1 ? EACCES : EPROTO;
		goto fail;
	}
	return 0;
fail: {
	int e = errno;
	close(r->fd);
	r->fd = -1;
	return -e;
}
}

/* One report (a record the caller filled; version/kind are set here).  1 when taken,
 * 0 when dropped (socket full, or the session has gone). */
static inline int udamon_report(struct udamon_reporter *r, struct udamon_report_rec *rec)
{
	const size_t cap = UDAMON_REPORT_BUFFER * sizeof(struct udamon_report_rec);
	rec->version = UDAMON_WIRE_VERSION;
	rec->kind = UDAMON_KIND_REPORT;
	if (r->gone) {
		r->dropped++;
		return 0;
	}
	if (r->len + sizeof(*rec) > cap) {
		/* full and not blocking: a send() per dropped report would burn the CPU the
		 * session needs to catch up, so wait a growing number of reports between tries */
		if (r->skip) {
			r->skip--;
			r->dropped++;
			return 0;
		}
		udamon__push(r, r->flags & UDAMON_REPORT_BLOCK);
		if (r->gone || r->len + sizeof(*rec) > cap) {
			r->backoff = r->backoff ? (r->backoff < 4096 ? r->backoff * 2 : 4096) : 16;
			r->skip = r->backoff;
			r->dropped++;
			return 0;
		}
		r->backoff = 0;
	}
	if (r->notified != r->dropped)
		udamon__notice(r); /* the buffer has one record of headroom for it */
	udamon__append(r, rec);
	r->sent++;
	if (r->len >= cap)
		udamon__push(r, r->flags & UDAMON_REPORT_BLOCK);
	return 1;
}

/* The common case: an access at addr of size bytes, made now. */
static inline int udamon_report_access(struct udamon_reporter *r, int pid, int tid, int cpu,
				       uint64_t addr, uint64_t size, int write)
{
	struct udamon_report_rec rec;
	memset(&rec, 0, sizeof(rec));
	rec.write = write ? 1 : 0;
	rec.time_ns = udamon_now_ns();
	rec.addr = addr;
	rec.size = size;
	rec.pid = pid;
	rec.tid = tid;
	rec.cpu = cpu;
	rec.node = -1;
	return udamon_report(r, &rec);
}

/* Send everything buffered (and the drop count), waiting up to timeout_ms.  0 when all
 * was sent, -EAGAIN when the time ran out, -EPIPE when the session has gone. */
static inline int udamon_reporter_flush(struct udamon_reporter *r, int timeout_ms)
{
	int64_t deadline = udamon_now_ns() + (int64_t)timeout_ms * 1000000;
	if (!r->gone && r->notified != r->dropped)
		udamon__notice(r);
	while (r->len && !r->gone) {
		udamon__push(r, 0);
		if (!r->len || r->gone)
			break;
		int left = (int)((deadline - udamon_now_ns()) / 1000000);
		if (left <= 0)
			return -EAGAIN;
		udamon__wait(r->fd, POLLOUT, left);
	}
	return r->gone ? -EPIPE : 0;
}

/* Flush (up to timeout_ms), close; returns the number of reports dropped. */
static inline uint64_t udamon_reporter_close(struct udamon_reporter *r, int timeout_ms)
{
	if (r->fd < 0)
		return r->dropped;
	if (udamon_reporter_flush(r, timeout_ms) == -EAGAIN) {
		uint64_t lost = r->len / sizeof(struct udamon_report_rec);
		r->sent -= lost < r->sent ? lost : r->sent;
		r->dropped += lost;
		r->len = 0;
		udamon_reporter_flush(r, 500);
	}
	close(r->fd);
	r->fd = -1;
	return r->dropped;
}

#endif /* UDAMON_REPORT_H */
