/*
 * DAMON's per-aggregation region adjustment (mm/damon/core.c) over udamon's
 * region arrays: the age rule, damon_merge_regions_of and damon_split_regions_of.
 *
 * Why in C: an idle session spends most of its CPU here.  The list is short
 * (tens of regions), but the numpy version makes ~80 small array calls per
 * aggregation, each costing several microseconds with cold caches after a
 * 100 ms sleep (~0.5 ms per aggregation, bench/analysis.md).  Python keeps the
 * policy (thresholds, when to split, the random draws); this file only walks
 * the arrays.  udamon.core.regions holds the same algorithm in numpy, used
 * when this module is not built; tests/test_regions_native.py checks that the
 * two agree on random region lists.
 *
 * Arrays are passed as 1-D C-contiguous buffers of 8-byte integers (addresses
 * unsigned, counters signed); outputs are preallocated by the caller.
 * Products of a counter and a size are taken in 128 bits, as Python's integers
 * do not overflow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_COLS 64

struct cols {
	int n;
	Py_buffer b[MAX_COLS];
};

static int get(PyObject *o, Py_buffer *b, int writable, Py_ssize_t min_len, const char *what)
{
	if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS |
			       PyBUF_FORMAT) < 0)
		return -1;
	if (b->itemsize != 8 || b->ndim != 1 || b->len / 8 < min_len) {
		PyErr_Format(PyExc_ValueError, "%s: need a 1-D array of >= %zd 8-byte integers",
			     what, min_len);
		PyBuffer_Release(b);
		return -1;
	}
	return 0;
}

static void release_cols(struct cols *c)
{
	for (int i = 0; i < c->n; i++)
		PyBuffer_Release(&c->b[i]);
	c->n = 0;
}

static int get_cols(PyObject *seq, struct cols *c, int writable, Py_ssize_t min_len,
		    const char *what)
{
	PyObject *fast = PySequence_Fast(seq, what);
	if (!fast)
		return -1;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
	c->n = 0;
	if (n > MAX_COLS) {
		PyErr_Format(PyExc_ValueError, "%s: at most %d columns", what, MAX_COLS);
		Py_DECREF(fast);
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (get(PySequence_Fast_GET_ITEM(fast, i), &c->b[i], writable, min_len, what) < 0) {
			release_cols(c);
			Py_DECREF(fast);
			return -1;
		}
		c->n++;
	}
	Py_DECREF(fast);
	return 0;
}

#define I64(c, i) ((int64_t *)(c).b[i].buf)

static inline int64_t absdiff(int64_t a, int64_t b)
{
	return a > b ? a - b : b - a;
}

static inline int64_t wavg(int64_t u, int64_t tot, int64_t v, int64_t sz)
{
	return (int64_t)(((__int128)u * tot + (__int128)v * sz) / (tot + sz));
}

/*
 * merge(start, end, avg, sums, weighted, thres, sz_limit, out_start, out_end,
 *       out_avg, out_sums) -> number of merged regions
 *
 * avg: counters combined by size-weighted average, step by step with integer
 * division (nr_accesses first, which the threshold applies to); sums: counters
 * that add up (written pages); weighted: (column in avg, weight, threshold) of
 * the probes that also steer merging.  Regions merge left to right, each into
 * the merged region before it, while adjacent, within the thresholds and the
 * size limit.
 */
static PyObject *merge(PyObject *self, PyObject *args)
{
	PyObject *start_o, *end_o, *avg_o, *sums_o, *weighted_o, *ostart_o, *oend_o, *oavg_o,
		*osums_o;
	long long thres, sz_limit;
	Py_buffer start = {0}, end = {0}, ostart = {0}, oend = {0};
	struct cols avg = {0}, sums = {0}, oavg = {0}, osums = {0};
	int wcol[MAX_COLS];
	long long wmul[MAX_COLS], wth[MAX_COLS];
	int64_t curw[MAX_COLS];
	Py_ssize_t nw = 0, m = -1;
	(void)self;

	if (!PyArg_ParseTuple(args, "OOOOOLLOOOO:merge", &start_o, &end_o, &avg_o, &sums_o,
			      &weighted_o, &thres, &sz_limit, &ostart_o, &oend_o, &oavg_o,
			      &osums_o))
		return NULL;
	if (get(start_o, &start, 0, 0, "start") < 0)
		return NULL;
	Py_ssize_t n = start.len / 8;
	if (get(end_o, &end, 0, n, "end") < 0 || get(ostart_o, &ostart, 1, n, "out start") < 0 ||
	    get(oend_o, &oend, 1, n, "out end") < 0 || get_cols(avg_o, &avg, 0, n, "avg") < 0 ||
	    get_cols(sums_o, &sums, 0, n, "sums") < 0 ||
	    get_cols(oavg_o, &oavg, 1, n, "out avg") < 0 ||
	    get_cols(osums_o, &osums, 1, n, "out sums") < 0)
		goto out;
	if (avg.n < 1 || oavg.n != avg.n || osums.n != sums.n) {
		PyErr_SetString(PyExc_ValueError, "merge: column counts differ");
		goto out;
	}
	PyObject *wf = PySequence_Fast(weighted_o, "weighted");
	if (!wf)
		goto out;
	nw = PySequence_Fast_GET_SIZE(wf);
	for (Py_ssize_t k = 0; k < nw && k < MAX_COLS; k++) {
		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(wf, k), "iLL:weighted", &wcol[k],
				      &wmul[k], &wth[k]) ||
		    wcol[k] < 0 || wcol[k] >= avg.n) {
			if (!PyErr_Occurred())
				PyErr_SetString(PyExc_ValueError, "weighted: bad column");
			Py_DECREF(wf);
			goto out;
		}
	}
	Py_DECREF(wf);
	if (nw > MAX_COLS) {
		PyErr_SetString(PyExc_ValueError, "weighted: too many probes");
		goto out;
	}

	const uint64_t *s = start.buf, *e = end.buf;
	uint64_t *os = ostart.buf, *oe = oend.buf;
	const int64_t *acc = avg.b[0].buf;
	m = 0;
	if (n == 0)
		goto out;
	/* the merge decision, as the kernel walks it: the running merged region's size,
	 * end, nr_accesses and weighted probe hits */
	int64_t cur_acc = acc[0], cur_sz = (int64_t)(e[0] - s[0]);
	uint64_t cur_end = e[0];
	for (Py_ssize_t k = 0; k < nw; k++)
		curw[k] = I64(avg, wcol[k])[0] * wmul[k];
	Py_ssize_t first = 0;
	for (Py_ssize_t i = 1; i <= n; i++) {
		int join = 0;
		int64_t sz = 0;
		if (i < n) {
			sz = (int64_t)(e[i] - s[i]);
			join = cur_end == s[i] && absdiff(cur_acc, acc[i]) <= thres &&
			       cur_sz + sz <= sz_limit;
			for (Py_ssize_t k = 0; join && k < nw; k++)
				join = absdiff(curw[k], I64(avg, wcol[k])[i] * wmul[k]) <= wth[k];
		}
		if (join) {
			int64_t tot = cur_sz + sz;
			cur_acc = wavg(cur_acc, cur_sz, acc[i], sz);
			for (Py_ssize_t k = 0; k < nw; k++)
				curw[k] = wavg(curw[k], cur_sz, I64(avg, wcol[k])[i] * wmul[k], sz);
			cur_sz = tot;
			cur_end = e[i];
			continue;
		}
		/* regions first..i-1 become merged region m: every averaged counter is
		 * combined step by step, as the kernel's damon_merge_two_regions does */
		os[m] = s[first];
		oe[m] = e[i - 1];
		for (int c = 0; c < avg.n; c++) {
			const int64_t *col = avg.b[c].buf;
			int64_t x = col[first], tot = (int64_t)(e[first] - s[first]);
			for (Py_ssize_t j = first + 1; j < i; j++) {
				int64_t szj = (int64_t)(e[j] - s[j]);
				if (col[j] != x)
					x = wavg(x, tot, col[j], szj);
				tot += szj;
			}
			I64(oavg, c)[m] = x;
		}
		for (int c = 0; c < sums.n; c++) {
			const int64_t *col = sums.b[c].buf;
			int64_t x = 0;
			for (Py_ssize_t j = first; j < i; j++)
				x += col[j];
			I64(osums, c)[m] = x;
		}
		m++;
		if (i < n) {
			first = i;
			cur_acc = acc[i];
			cur_sz = sz;
			cur_end = e[i];
			for (Py_ssize_t k = 0; k < nw; k++)
				curw[k] = I64(avg, wcol[k])[i] * wmul[k];
		}
	}
out:
	PyBuffer_Release(&start);
	PyBuffer_Release(&end);
	PyBuffer_Release(&ostart);
	PyBuffer_Release(&oend);
	release_cols(&avg);
	release_cols(&sums);
	release_cols(&oavg);
	release_cols(&osums);
	if (PyErr_Occurred())
		return NULL;
	return PyLong_FromSsize_t(m);
}

/*
 * split(start, end, cols, draws, min_sz, out_start, out_end, out_cols) -> regions
 *
 * draws: one array per cut (1 or 2) of random integers in 1..9, one per region:
 * a cut at draw/10 of the piece still being cut (its first piece, for the
 * second cut), rounded down to min_sz, skipped where it would leave nothing or
 * the region is no larger than two min_sz.  Every piece keeps its region's
 * counters (cols).  The outputs hold room for (cuts + 1) * n regions.
 */
static PyObject *split(PyObject *self, PyObject *args)
{
	PyObject *start_o, *end_o, *cols_o, *draws_o, *ostart_o, *oend_o, *ocols_o;
	long long min_sz;
	Py_buffer start = {0}, end = {0}, ostart = {0}, oend = {0};
	struct cols cols = {0}, draws = {0}, ocols = {0};
	Py_ssize_t m = -1;
	(void)self;

	if (!PyArg_ParseTuple(args, "OOOOLOOO:split", &start_o, &end_o, &cols_o, &draws_o,
			      &min_sz, &ostart_o, &oend_o, &ocols_o))
		return NULL;
	if (get(start_o, &start, 0, 0, "start") < 0)
		return NULL;
	Py_ssize_t n = start.len / 8;
	if (get(end_o, &end, 0, n, "end") < 0 || get_cols(cols_o, &cols, 0, n, "cols") < 0 ||
	    get_cols(draws_o, &draws, 0, n, "draws") < 0)
		goto out;
	Py_ssize_t cap = (draws.n + 1) * n;
	if (get(ostart_o, &ostart, 1, cap, "out start") < 0 ||
	    get(oend_o, &oend, 1, cap, "out end") < 0 ||
	    get_cols(ocols_o, &ocols, 1, cap, "out cols") < 0)
		goto out;
	if (draws.n < 1 || draws.n > 2 || ocols.n != cols.n || min_sz <= 0) {
		PyErr_SetString(PyExc_ValueError, "split: 1 or 2 draws, matching columns");
		goto out;
	}
	const uint64_t *s = start.buf, *e = end.buf;
	uint64_t *os = ostart.buf, *oe = oend.buf;
	m = 0;
	for (Py_ssize_t i = 0; i < n; i++) {
		int64_t st = (int64_t)s[i], sz = (int64_t)(e[i] - s[i]);
		int64_t cut[2];
		int ncut = 0;
		for (int d = 0; d < draws.n; d++) {
			int64_t r = I64(draws, d)[i];
			int64_t sub = (r * sz / 10) / min_sz * min_sz;
			if (sz > 2 * min_sz && sub > 0 && sub < sz) {
				cut[ncut++] = st + sub;
				sz = sub;
			}
		}
		/* pieces in address order: the second cut lies inside the first piece */
		int64_t bounds[4];
		int nb = 0;
		bounds[nb++] = st;
		for (int k = ncut - 1; k >= 0; k--)
			bounds[nb++] = cut[k];
		bounds[nb] = (int64_t)e[i];
		for (int k = 0; k < nb; k++) {
			os[m] = (uint64_t)bounds[k];
			oe[m] = (uint64_t)bounds[k + 1];
			for (int c = 0; c < cols.n; c++)
				I64(ocols, c)[m] = I64(cols, c)[i];
			m++;
		}
	}
out:
	PyBuffer_Release(&start);
	PyBuffer_Release(&end);
	PyBuffer_Release(&ostart);
	PyBuffer_Release(&oend);
	release_cols(&cols);
	release_cols(&draws);
	release_cols(&ocols);
	if (PyErr_Occurred())
		return NULL;
	return PyLong_FromSsize_t(m);
}

/* ages(nr_accesses, last_nr_accesses, age, thres, out_age): kdamond_merge_regions' age
 * rule: reset where the count changed by more than thres or went from zero to non-zero
 * (or back), else one older */
static PyObject *ages(PyObject *self, PyObject *args)
{
	PyObject *acc_o, *last_o, *age_o, *out_o;
	long long thres;
	Py_buffer acc = {0}, last = {0}, age = {0}, out = {0};
	(void)self;

	if (!PyArg_ParseTuple(args, "OOOLO:ages", &acc_o, &last_o, &age_o, &thres, &out_o))
		return NULL;
	if (get(acc_o, &acc, 0, 0, "nr_accesses") < 0)
		return NULL;
	Py_ssize_t n = acc.len / 8;
	if (get(last_o, &last, 0, n, "last_nr_accesses") < 0 || get(age_o, &age, 0, n, "age") < 0 ||
	    get(out_o, &out, 1, n, "out age") < 0)
		goto done;
	const int64_t *a = acc.buf, *l = last.buf, *g = age.buf;
	int64_t *o = out.buf;
	for (Py_ssize_t i = 0; i < n; i++) {
		int changed = absdiff(a[i], l[i]) > thres || ((a[i] == 0) != (l[i] == 0));
		o[i] = changed ? 0 : g[i] + 1;
	}
done:
	PyBuffer_Release(&acc);
	PyBuffer_Release(&last);
	PyBuffer_Release(&age);
	PyBuffer_Release(&out);
	if (PyErr_Occurred())
		return NULL;
	Py_RETURN_NONE;
}

/* summary(start, end, nr_accesses) -> (total bytes, highest nr_accesses or 0):
 * what kdamond_merge_regions needs before merging, in one walk */
static PyObject *summary(PyObject *self, PyObject *args)
{
	PyObject *start_o, *end_o, *acc_o;
	Py_buffer start = {0}, end = {0}, acc = {0};
	unsigned long long total = 0;
	long long hi = 0;
	(void)self;

	if (!PyArg_ParseTuple(args, "OOO:summary", &start_o, &end_o, &acc_o))
		return NULL;
	if (get(start_o, &start, 0, 0, "start") < 0)
		return NULL;
	Py_ssize_t n = start.len / 8;
	if (get(end_o, &end, 0, n, "end") < 0 || get(acc_o, &acc, 0, n, "nr_accesses") < 0)
		goto done;
	const uint64_t *s = start.buf, *e = end.buf;
	const int64_t *a = acc.buf;
	for (Py_ssize_t i = 0; i < n; i++) {
		total += e[i] - s[i];
		if (a[i] > hi)
			hi = a[i];
	}
done:
	PyBuffer_Release(&start);
	PyBuffer_Release(&end);
	PyBuffer_Release(&acc);
	if (PyErr_Occurred())
		return NULL;
	return Py_BuildValue("KL", total, hi);
}


/*
 * distinct(starts, ends, keys, shift, out): per region, the distinct keys among
 * ``keys`` (uint64: page number << shift | column) by column: out[region * width +
 * column] += 1 for each distinct key whose page (page * 4096) a region holds, with
 * width = len(out) / len(starts); columns >= width are left out.  A hash set instead
 * of numpy's sort: sorting 10k page keys cost ~280 us here, this ~30 (written pages
 * and the pages by node of each aggregation of hint's reports).
 */
static PyObject *distinct(PyObject *self, PyObject *args)
{
	(void)self;
	PyObject *so, *eo, *ko, *oo;
	int shift;
	if (!PyArg_ParseTuple(args, "OOOiO", &so, &eo, &ko, &shift, &oo))
		return NULL;
	if (shift < 0 || shift > 32) {
		PyErr_SetString(PyExc_ValueError, "distinct: shift must be in 0..32");
		return NULL;
	}
	Py_buffer sb, eb, kb, ob;
	if (get(so, &sb, 0, 0, "starts") < 0)
		return NULL;
	Py_ssize_t nr = sb.len / 8;
	if (get(eo, &eb, 0, nr, "ends") < 0) {
		PyBuffer_Release(&sb);
		return NULL;
	}
	if (get(ko, &kb, 0, 0, "keys") < 0) {
		PyBuffer_Release(&sb);
		PyBuffer_Release(&eb);
		return NULL;
	}
	if (get(oo, &ob, 1, nr, "out") < 0) {
		PyBuffer_Release(&sb);
		PyBuffer_Release(&eb);
		PyBuffer_Release(&kb);
		return NULL;
	}
	PyObject *ret = NULL;
	const uint64_t *st = sb.buf, *en = eb.buf, *keys = kb.buf;
	int64_t *out = ob.buf;
	Py_ssize_t nk = kb.len / 8, width = nr ? (ob.len / 8) / nr : 0;
	size_t cap = 16;
	int bits = 4;
	while (cap < (size_t)nk * 2) {
		cap <<= 1;
		bits++;
	}
	uint64_t *table = PyMem_Malloc(cap * sizeof(uint64_t));
	unsigned char *used = PyMem_Calloc(cap, 1);
	if (!table || !used) {
		PyErr_NoMemory();
		goto done;
	}
	uint64_t colmask = shift ? ((1ULL << shift) - 1) : 0;
	for (Py_ssize_t i = 0; i < nk; i++) {
		uint64_t k = keys[i];
		size_t h = (size_t)((k * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
		while (used[h] && table[h] != k)
			h = (h + 1) & (cap - 1);
		if (used[h])
			continue; /* seen */
		used[h] = 1;
		table[h] = k;
		uint64_t col = k & colmask;
		if (nr == 0 || (Py_ssize_t)col >= width)
			continue;
		uint64_t addr = (k >> shift) * 4096ULL;
		Py_ssize_t lo = 0, hi = nr; /* the last region starting at or before addr */
		while (lo < hi) {
			Py_ssize_t mid = lo + (hi - lo) / 2;
			if (st[mid] <= addr)
				lo = mid + 1;
			else
				hi = mid;
		}
		if (lo == 0 || addr >= en[lo - 1])
			continue;
		out[(lo - 1) * width + (Py_ssize_t)col]++;
	}
	ret = Py_None;
	Py_INCREF(ret);
done:
	PyMem_Free(table);
	PyMem_Free(used);
	PyBuffer_Release(&sb);
	PyBuffer_Release(&eb);
	PyBuffer_Release(&kb);
	PyBuffer_Release(&ob);
	return ret;
}

static PyMethodDef methods[] = {
	{"merge", merge, METH_VARARGS, "damon_merge_regions_of over udamon's region arrays"},
	{"split", split, METH_VARARGS, "damon_split_regions_of over udamon's region arrays"},
	{"ages", ages, METH_VARARGS, "kdamond_merge_regions' age rule"},
	{"summary", summary, METH_VARARGS, "(total bytes, highest nr_accesses) of the regions"},
	{"distinct", distinct, METH_VARARGS, "distinct page keys per region and column"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_regions",
	"DAMON's region adjustment in C (see udamon.core.regions)", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__regions(void)
{
	return PyModule_Create(&module);
}
