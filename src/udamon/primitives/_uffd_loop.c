/*
 * udamon.primitives._uffd_loop: the controlled sampling loop of wp and rwp in C.
 *
 * The same algorithm as run_window() in uffd_loop.py (read that first; this file
 * mirrors it line for line): for each sampling turn of one aggregation interval,
 * protect one page per region of every target (UFFDIO_WRITEPROTECT or
 * UFFDIO_RWPROTECT, runs of adjacent pages in one ioctl), sleep in ppoll() on the
 * session's stop fd and the targets' pidfds until the turn ends, then ask
 * PAGEMAP_SCAN which armed pages were accessed -- one scan per cluster of armed
 * pages closer than `join` bytes, in chunks of at most `chunk` bytes.  The GIL is
 * released for the whole window; only buffers obtained up front are touched.
 *
 * Why C: at DAMON's default 5 ms sampling interval the Python loop spent ~5 ms
 * of CPU per turn and fell behind; see bench/analysis.md for the numbers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sched.h>
#include <time.h>

enum { NOT_ARMED = 0, ARMED = 1, HIT = 2, UNPOPULATED = 3, FAILED = 4 };
enum { WHY_DONE = 0, WHY_STOPPED = 1, WHY_EXITED = 2, WHY_MM_GONE = 3, WHY_SIGNAL = 4 };
enum { GONE_NO = 0, GONE_EXITED = 1, GONE_MM = 2 };

#define PAGEMAP_SCAN_IOCTL 0xC0606610UL
#define VEC_LEN 4096

struct pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

struct page_region {
	uint64_t start, end, categories;
};

struct prot_arg {
	uint64_t start, len, mode;
};

struct target {
	int uffd, pagemap, pidfd;
	int gone;
	Py_buffer pages, lo, hi, state;
	Py_ssize_t nr, nspans;
	uint64_t *pg;
	uint64_t *slo, *shi;
	uint8_t *st;
	Py_ssize_t *armed; /* indices (regions) armed this turn, ascending by page */
	Py_ssize_t narmed;
};

struct params {
	unsigned long protect_cmd;
	uint64_t protect_flag, cat_mask, anyof_mask, ret_mask, hit, populated;
	uint64_t page_size, join, chunk;
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Is [page, page + psz) inside one of the sorted spans [lo[i], hi[i])? */
static int inside(const struct target *t, uint64_t page, uint64_t psz)
{
	Py_ssize_t a = 0, b = t->nspans;
	while (a < b) { /* first span with lo > page */
		Py_ssize_t m = (a + b) / 2;
		if (t->slo[m] <= page)
			a = m + 1;
		else
			b = m;
	}
	if (a == 0)
		return 0;
	return page >= t->slo[a - 1] && page + psz <= t->shi[a - 1];
}

/* Insertion sort of region indices by page (reentrant: the GIL is not held). */
static void sort_by_page(Py_ssize_t *idx, Py_ssize_t n, const uint64_t *pg)
{
	for (Py_ssize_t i = 1; i < n; i++) {
		Py_ssize_t v = idx[i], j = i;
		while (j > 0 && pg[idx[j - 1]] > pg[v]) {
			idx[j] = idx[j - 1];
			j--;
		}
		idx[j] = v;
	}
}

/* Protect this turn's pages of one target; fills t->armed. */
static void protect_turn(struct target *t, const struct params *p, Py_ssize_t turn)
{
	uint64_t *pg = t->pg + turn * t->nr;
	uint8_t *st = t->st + turn * t->nr;
	Py_ssize_t i, n = 0, sorted = 1;

	t->narmed = 0;
	for (i = 0; i < t->nr; i++) {
		if (!inside(t, pg[i], p->page_size))
			continue;
		if (n && pg[i] <= pg[t->armed[n - 1]])
			sorted = 0;
		t->armed[n++] = i;
	}
	if (!sorted) /* regions are sorted, so this does not happen; stay correct anyway */
		sort_by_page(t->armed, n, pg);
	i = 0;
	while (i < n) {
		Py_ssize_t j = i;
		struct prot_arg arg;

		while (j + 1 < n && pg[t->armed[j + 1]] == pg[t->armed[j]] + p->page_size)
			j++;
		arg.start = pg[t->armed[i]];
		arg.len = (uint64_t)(j - i + 1) * p->page_size;
		arg.mode = p->protect_flag;
		if (ioctl(t->uffd, p->protect_cmd, &arg) < 0) {
			if (errno == ESRCH) {
				t->gone = GONE_MM;
				t->narmed = 0;
				return;
			}
			for (Py_ssize_t k = i; k <= j; k++)
				st[t->armed[k]] = FAILED;
		} else {
			for (Py_ssize_t k = i; k <= j; k++)
				st[t->armed[k]] = ARMED;
		}
		i = j + 1;
	}
	/* keep only the armed ones */
	t->narmed = 0;
	for (i = 0; i < n; i++)
		if (st[t->armed[i]] == ARMED)
			t->armed[t->narmed++] = t->armed[i];
}

static uint8_t classify(const struct params *p, uint64_t cats)
{
	if (cats & p->hit)
		return HIT;
	if (p->populated && !(cats & p->populated))
		return UNPOPULATED;
	return ARMED;
}

/* PAGEMAP_SCAN the armed pages of this turn; returns -1 with errno on failure. */
static int scan_turn(struct target *t, const struct params *p, Py_ssize_t turn,
		     struct page_region *vec)
{
	uint64_t *pg = t->pg + turn * t->nr;
	uint8_t *st = t->st + turn * t->nr;
	Py_ssize_t i = 0, n = t->narmed;
	const Py_ssize_t *a = t->armed;

	while (i < n) {
		Py_ssize_t j = i, k = i;
		uint64_t lo, hi, start;

		while (j + 1 < n && pg[a[j + 1]] - pg[a[j]] <= p->join)
			j++;
		lo = pg[a[i]];
		hi = pg[a[j]] + p->page_size;
		for (start = lo; start < hi;) {
			uint64_t end = hi - start > p->chunk ? start + p->chunk : hi;
			uint64_t cur = start;
			for (;;) {
				struct pm_scan_arg arg = {
					.size = sizeof(arg), .start = cur, .end = end,
					.vec = (uint64_t)(uintptr_t)vec, .vec_len = VEC_LEN,
					.category_mask = p->cat_mask,
					.category_anyof_mask = p->anyof_mask,
					.return_mask = p->ret_mask,
				};
				long r = ioctl(t->pagemap, PAGEMAP_SCAN_IOCTL, &arg);
				if (r < 0)
					return -1;
				for (long q = 0; q < r; q++) {
					while (k <= j && pg[a[k]] < vec[q].start) {
						st[a[k]] = classify(p, 0);
						k++;
					}
					while (k <= j && pg[a[k]] < vec[q].end) {
						st[a[k]] = classify(p, vec[q].categories);
						k++;
					}
				}
				/* everything in [cur, end) was reported: ignore walk_end (FACTS.md) */
				if (r < VEC_LEN || arg.walk_end <= cur)
					break;
				cur = arg.walk_end;
			}
			start = end;
		}
		for (; k <= j; k++)
			st[a[k]] = classify(p, 0);
		i = j + 1;
	}
	return 0;
}

static int get_buffer(PyObject *o, Py_buffer *b, int writable)
{
	return PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS);
}

static PyObject *run_window(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = {"targets", "protect_cmd", "protect_flag", "cat_mask",
				 "anyof_mask", "ret_mask", "hit", "populated", "tick0_ns",
				 "sample_ns", "first", "turns", "stop_fd", "arm_ns", "scan_ns",
				 "page_size", "join", "chunk", "rt_priority", NULL};
	PyObject *targets_o, *result = NULL;
	struct params p;
	long long tick0, sample;
	Py_ssize_t first, turns;
	int stop_fd;
	Py_buffer arm_b = {0}, scan_b = {0};
	unsigned long long page_size, join, chunk, pflag, cmask, amask, rmask, hit, populated;
	unsigned long pcmd;
	struct target *ts = NULL;
	Py_ssize_t nt = 0, got = 0, t;
	struct page_region *vec = NULL;
	struct pollfd *pfds = NULL;
	int why = WHY_DONE;
	int rt_priority = 0, rt_on = 0, old_policy = SCHED_OTHER;
	struct sched_param old_param = {0};
	long late = 0, run = 0;
	Py_ssize_t next;
	(void)self;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "OkKKKKKKLLnniw*w*KKK|i", kwlist, &targets_o,
					 &pcmd, &pflag, &cmask, &amask, &rmask, &hit,
					 &populated, &tick0, &sample, &first, &turns, &stop_fd,
					 &arm_b, &scan_b, &page_size, &join, &chunk, &rt_priority))
		return NULL;
	p.protect_cmd = pcmd;
	p.protect_flag = pflag;
	p.cat_mask = cmask;
	p.anyof_mask = amask;
	p.ret_mask = rmask;
	p.hit = hit;
	p.populated = populated;
	p.page_size = page_size;
	p.join = join;
	p.chunk = chunk;
	next = turns;
	if ((Py_ssize_t)(arm_b.len / 8) < turns || (Py_ssize_t)(scan_b.len / 8) < turns) {
		PyErr_SetString(PyExc_ValueError, "arm_ns/scan_ns shorter than the window");
		goto out;
	}
	targets_o = PySequence_Fast(targets_o, "targets must be a sequence");
	if (!targets_o)
		goto out;
	nt = PySequence_Fast_GET_SIZE(targets_o);
	ts = calloc(nt ? nt : 1, sizeof(*ts));
	pfds = calloc(nt + 1, sizeof(*pfds));
	vec = malloc(sizeof(*vec) * VEC_LEN);
	if (!ts || !pfds || !vec) {
		PyErr_NoMemory();
		goto out_seq;
	}
	for (t = 0; t < nt; t++) {
		struct target *x = &ts[t];
		PyObject *pages_o, *lo_o, *hi_o, *state_o;
		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(targets_o, t), "iiiOOOOi:target",
				      &x->uffd, &x->pagemap, &x->pidfd, &pages_o, &lo_o, &hi_o,
				      &state_o, &x->gone))
			goto out_seq;
		if (get_buffer(pages_o, &x->pages, 0) < 0)
			goto out_seq;
		got = t + 1; /* x->pages held */
		if (get_buffer(lo_o, &x->lo, 0) < 0 || get_buffer(hi_o, &x->hi, 0) < 0 ||
		    get_buffer(state_o, &x->state, 1) < 0)
			goto out_seq;
		if (x->pages.len % 8 || x->pages.len / 8 != x->state.len ||
		    (turns && (x->pages.len / 8) % turns) || x->lo.len != x->hi.len) {
			PyErr_SetString(PyExc_ValueError, "inconsistent target buffers");
			goto out_seq;
		}
		x->nr = turns ? (Py_ssize_t)(x->pages.len / 8) / turns : 0;
		x->nspans = x->lo.len / 8;
		x->pg = x->pages.buf;
		x->slo = x->lo.buf;
		x->shi = x->hi.buf;
		x->st = x->state.buf;
		x->armed = malloc(sizeof(Py_ssize_t) * (x->nr ? x->nr : 1));
		if (!x->armed) {
			PyErr_NoMemory();
			goto out_seq;
		}
	}

	Py_BEGIN_ALLOW_THREADS
	/* rt_priority > 0: this thread is SCHED_FIFO for the window's turns only (woken on
	 * time however busy the target keeps the CPUs), normal again before Python runs */
	if (rt_priority > 0) {
		struct sched_param sp = {.sched_priority = rt_priority};
		old_policy = sched_getscheduler(0);
		sched_getparam(0, &old_param);
		rt_on = old_policy >= 0 && sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
	}
	int64_t *arm_ns = arm_b.buf, *scan_ns = scan_b.buf;
	int64_t late_ns = sample / 10;
	int64_t prev_end = 0;
	for (Py_ssize_t turn = first; turn < turns; turn++) {
		/* DAMON's turns are back to back: a late turn starts now and still lasts a
		 * whole sampling interval (kdamond counts samples, not wall time) */
		int64_t tick = tick0 + turn * sample, now = now_ns(), end;
		int nfds = 0, ready_stop = 0, ready_exit = 0, intr = 0;

		if (prev_end > tick)
			tick = prev_end;
		if (now - tick > late_ns)
			late++;
		if (now > tick)
			tick = now;
		end = tick + sample;
		prev_end = end;
		arm_ns[turn] = now; /* before protecting: a fault cannot come earlier */
		for (t = 0; t < nt; t++) {
			ts[t].narmed = 0;
			if (!ts[t].gone)
				protect_turn(&ts[t], &p, turn);
		}
		if (stop_fd >= 0) {
			pfds[nfds].fd = stop_fd;
			pfds[nfds++].events = POLLIN;
		}
		for (t = 0; t < nt; t++) {
			if (ts[t].pidfd >= 0 && !ts[t].gone) {
				pfds[nfds].fd = ts[t].pidfd;
				pfds[nfds++].events = POLLIN;
			}
		}
		for (;;) {
			int64_t left = end - now_ns();
			struct timespec to;
			int r;
			if (left <= 0)
				break;
			to.tv_sec = left / 1000000000LL;
			to.tv_nsec = left % 1000000000LL;
			r = ppoll(pfds, nfds, &to, NULL);
			if (r < 0 && errno == EINTR) {
				intr = 1;
				break;
			}
			if (r > 0) {
				for (int q = 0; q < nfds; q++) {
					if (!pfds[q].revents)
						continue;
					if (pfds[q].fd == stop_fd)
						ready_stop = 1;
					else
						for (t = 0; t < nt; t++)
							if (ts[t].pidfd == pfds[q].fd && !ts[t].gone) {
								ts[t].gone = GONE_EXITED;
								ready_exit = 1;
							}
				}
				break;
			}
			if (r < 0)
				break;
		}
		for (t = 0; t < nt; t++) {
			struct target *x = &ts[t];
			if (x->gone || !x->narmed)
				continue;
			if (scan_turn(x, &p, turn, vec) < 0) {
				/* ESRCH: the mm is gone (exit or exec); other errors: not observed */
				uint8_t *st = x->st + turn * x->nr;
				for (Py_ssize_t k = 0; k < x->narmed; k++)
					st[x->armed[k]] = NOT_ARMED;
				if (errno == ESRCH)
					x->gone = GONE_MM;
			}
		}
		scan_ns[turn] = now_ns();
		run++;
		for (t = 0; t < nt; t++)
			if (ts[t].gone == GONE_MM)
				why = WHY_MM_GONE;
		if (why == WHY_DONE && ready_exit)
			why = WHY_EXITED;
		if (why == WHY_DONE && ready_stop)
			why = WHY_STOPPED;
		if (why == WHY_DONE && intr)
			why = WHY_SIGNAL;
		if (why != WHY_DONE) {
			next = turn + 1;
			break;
		}
	}
	if (rt_on)
		sched_setscheduler(0, old_policy, &old_param);
	Py_END_ALLOW_THREADS

	{
		PyObject *gone = PyTuple_New(nt);
		if (!gone)
			goto out_seq;
		for (t = 0; t < nt; t++)
			PyTuple_SET_ITEM(gone, t, PyLong_FromLong(ts[t].gone));
		result = Py_BuildValue("(niiiN)", next, why, (int)late, (int)run, gone);
	}
out_seq:
	for (t = 0; t < got; t++) {
		PyBuffer_Release(&ts[t].pages);
		if (ts[t].lo.obj)
			PyBuffer_Release(&ts[t].lo);
		if (ts[t].hi.obj)
			PyBuffer_Release(&ts[t].hi);
		if (ts[t].state.obj)
			PyBuffer_Release(&ts[t].state);
	}
	for (t = 0; t < nt && ts; t++)
		free(ts[t].armed);
	free(ts);
	free(pfds);
	free(vec);
	Py_DECREF(targets_o);
out:
	PyBuffer_Release(&arm_b);
	PyBuffer_Release(&scan_b);
	return result;
}

static PyMethodDef methods[] = {
	{"run_window", (PyCFunction)(void (*)(void))run_window, METH_VARARGS | METH_KEYWORDS,
	 "Run the sampling turns of one window (see udamon.primitives.uffd_loop.run_window)."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_uffd_loop",
	"The controlled sampling loop of wp and rwp in C (udamon.primitives.uffd_loop).", -1,
	methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__uffd_loop(void)
{
	return PyModule_Create(&module);
}
