/*
 * udamon.system._perf_ring: the page-fault tracer's ring buffer read straight into
 * access reports (see udamon.system.perf_tracepoint.FaultTracer.read_reports).
 *
 * Why C: at 100k faults/s the numpy path (copy the ring out, parse, drop foreign
 * pids and duplicate event families, convert to FAULT_DTYPE, then to REPORT_DTYPE)
 * cost ~170 ns per fault, a third of udamon's CPU per fault; one pass over the ring
 * in place costs a few ns (bench/analysis.md).
 *
 * take_reports(ring, data_off, data_size, layout, pids, ids, fams, good, cpu_nodes,
 *              source, out, out_layout, keys) -> (n, foreign, undecided, lost)
 *
 *   ring       the ring's writable mmap (user page, then data_size bytes at data_off)
 *   layout     (rec_size, id, pid, tid, time, cpu, addr, error_code): offsets in a
 *              PERF_RECORD_SAMPLE (id < 0: none)
 *   pids       sorted int32 target tgids; samples of other pids are counted as foreign
 *   ids, fams  sorted uint64 event ids and their int64 event families (per-thread
 *              mode; empty otherwise): key = tid << 20 | (family & 0xFFFFF)
 *   good       sorted int64 keys known to be kept
 *   cpu_nodes  int32 CPU -> node table
 *   out        writable REPORT_DTYPE array; out_layout (itemsize, time_ns, pid, tid,
 *              cpu, node, addr, size, write, source, mem, page_node) offsets
 *   keys       writable int64 array as long as out: each report's key
 *
 * At most len(out) reports are written; the ring's tail is advanced past the records
 * consumed (what does not fit stays for the next call).  ``undecided``: reports whose
 * key is not in ``good`` (the caller decides about those).  PERF_RECORD_LOST and
 * PERF_RECORD_LOST_SAMPLES add to ``lost``; other records are stepped over.
 *
 * Memory order (perf_event_open(2)): data_head is loaded with acquire semantics
 * before the records are read, data_tail stored with release semantics after.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define OFF_DATA_HEAD 1024
#define OFF_DATA_TAIL 1032
#define PERF_RECORD_LOST 2
#define PERF_RECORD_SAMPLE 9
#define PERF_RECORD_LOST_SAMPLES 13
#define PAGE 4096ULL

struct layout {
	Py_ssize_t rec, id, pid, tid, time, cpu, addr, err;
};

struct out_layout {
	Py_ssize_t size, time, pid, tid, cpu, node, addr, bytes, write, source, mem, page_node;
};

static inline uint64_t ld64(const unsigned char *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static inline int32_t ld32(const unsigned char *p)
{
	int32_t v;
	memcpy(&v, p, 4);
	return v;
}

/* The first index of sorted a[0..n) whose element is >= v (one search for every type). */
#define LOWER_BOUND(a, n, v)                                                   \
	({                                                                     \
		Py_ssize_t lo_ = 0, hi_ = (n);                                 \
		while (lo_ < hi_) {                                            \
			Py_ssize_t mid_ = lo_ + (hi_ - lo_) / 2;               \
			if ((a)[mid_] < (v))                                   \
				lo_ = mid_ + 1;                                \
			else                                                   \
				hi_ = mid_;                                    \
		}                                                              \
		lo_;                                                           \
	})

static int in_sorted_i32(const int32_t *a, Py_ssize_t n, int32_t v)
{
	Py_ssize_t i = LOWER_BOUND(a, n, v);
	return i < n && a[i] == v;
}

static int in_sorted_i64(const int64_t *a, Py_ssize_t n, int64_t v)
{
	Py_ssize_t i = LOWER_BOUND(a, n, v);
	return i < n && a[i] == v;
}

static int64_t family_of(const uint64_t *ids, const int64_t *fams, Py_ssize_t n, uint64_t id)
{
	Py_ssize_t i = LOWER_BOUND(ids, n, id);
	return (i < n && ids[i] == id) ? fams[i] : -1;
}

static PyObject *take_reports(PyObject *self, PyObject *args)
{
	(void)self;
	Py_buffer ring, pids, ids, fams, good, nodes, out, keys;
	Py_ssize_t data_off, data_size;
	struct layout L;
	struct out_layout O;
	int source;
	if (!PyArg_ParseTuple(args, "w*nn(nnnnnnnn)y*y*y*y*y*iw*(nnnnnnnnnnnn)w*", &ring,
			      &data_off, &data_size, &L.rec, &L.id, &L.pid, &L.tid, &L.time,
			      &L.cpu, &L.addr, &L.err, &pids, &ids, &fams, &good, &nodes, &source,
			      &out, &O.size, &O.time, &O.pid, &O.tid, &O.cpu, &O.node, &O.addr,
			      &O.bytes, &O.write, &O.source, &O.mem, &O.page_node, &keys))
		return NULL;
	PyObject *ret = NULL;
	if (data_size <= 0 || (data_size & (data_size - 1)) || data_off < OFF_DATA_TAIL + 8 ||
	    data_off + data_size > ring.len || L.rec < 8 || L.rec > 65535 || O.size <= 0 ||
	    ids.len / 8 != fams.len / 8 || keys.len / 8 < out.len / O.size) {
		PyErr_SetString(PyExc_ValueError, "take_reports: inconsistent ring or layout");
		goto done;
	}
	{
		unsigned char *base = ring.buf;
		uint64_t *headp = (uint64_t *)(base + OFF_DATA_HEAD);
		uint64_t *tailp = (uint64_t *)(base + OFF_DATA_TAIL);
		unsigned char *data = base + data_off;
		uint64_t size = (uint64_t)data_size, mask = size - 1;
		uint64_t head = __atomic_load_n(headp, __ATOMIC_ACQUIRE);
		uint64_t tail = *tailp;
		Py_ssize_t cap = out.len / O.size, n = 0;
		long long foreign = 0, undecided = 0, lost = 0;
		const int32_t *pid_a = pids.buf;
		Py_ssize_t npid = pids.len / 4;
		const uint64_t *id_a = ids.buf;
		const int64_t *fam_a = fams.buf;
		Py_ssize_t nid = ids.len / 8;
		const int64_t *good_a = good.buf;
		Py_ssize_t ngood = good.len / 8;
		const int32_t *node_a = nodes.buf;
		Py_ssize_t nnode = nodes.len / 4;
		unsigned char *o = out.buf;
		int64_t *key_a = keys.buf;
		static unsigned char tmp[65536];
		while (head - tail >= 8) {
			unsigned char *rec = data + (tail & mask);
			uint64_t room = size - (tail & mask);
			uint32_t type;
			uint16_t rsize;
			if (room < 8) {
				memcpy(tmp, rec, room);
				memcpy(tmp + room, data, 8 - room);
				rec = tmp;
			}
			memcpy(&type, rec, 4);
			memcpy(&rsize, rec + 6, 2);
			if (rsize < 8 || rsize > head - tail)
				break; /* corrupt or not yet complete: leave it */
			if (type == PERF_RECORD_SAMPLE && n >= cap)
				break; /* no room: the rest stays for the next call */
			if (room < rsize) { /* the record wraps around the ring's end */
				memcpy(tmp, data + (tail & mask), room);
				memcpy(tmp + room, data, rsize - room);
				rec = tmp;
			} else {
				rec = data + (tail & mask);
			}
			tail += rsize;
			if (type == PERF_RECORD_LOST) {
				if (rsize >= 24)
					lost += (long long)ld64(rec + 16);
				continue;
			}
			if (type == PERF_RECORD_LOST_SAMPLES) {
				if (rsize >= 16)
					lost += (long long)ld64(rec + 8);
				continue;
			}
			if (type != PERF_RECORD_SAMPLE || rsize != L.rec)
				continue;
			int32_t pid = ld32(rec + L.pid);
			if (npid == 1 ? pid != pid_a[0] : !in_sorted_i32(pid_a, npid, pid)) {
				foreign++;
				continue;
			}
			int32_t tid = ld32(rec + L.tid), cpu = ld32(rec + L.cpu);
			int64_t key = 0;
			if (nid && L.id >= 0) {
				int64_t fam = family_of(id_a, fam_a, nid, ld64(rec + L.id));
				key = ((int64_t)tid << 20) | (fam & 0xFFFFF);
				if (!in_sorted_i64(good_a, ngood, key))
					undecided++;
			}
			unsigned char *r = o + n * O.size;
			uint64_t t = ld64(rec + L.time);
			uint64_t addr = ld64(rec + L.addr) & ~(PAGE - 1);
			uint64_t pg = PAGE;
			int32_t node = (cpu >= 0 && cpu < nnode) ? node_a[cpu] : -1, unknown = -1;
			unsigned char w = (ld64(rec + L.err) & 0x2) != 0, src = (unsigned char)source,
				      mem = 0;
			memcpy(r + O.time, &t, 8);
			memcpy(r + O.pid, &pid, 4);
			memcpy(r + O.tid, &tid, 4);
			memcpy(r + O.cpu, &cpu, 4);
			memcpy(r + O.node, &node, 4);
			memcpy(r + O.addr, &addr, 8);
			memcpy(r + O.bytes, &pg, 8);
			memcpy(r + O.write, &w, 1);
			memcpy(r + O.source, &src, 1);
			memcpy(r + O.mem, &mem, 1);
			memcpy(r + O.page_node, &unknown, 4);
			key_a[n] = key;
			n++;
		}
		__atomic_store_n(tailp, tail, __ATOMIC_RELEASE);
		ret = Py_BuildValue("nLLL", n, foreign, undecided, lost);
	}
done:
	PyBuffer_Release(&ring);
	PyBuffer_Release(&pids);
	PyBuffer_Release(&ids);
	PyBuffer_Release(&fams);
	PyBuffer_Release(&good);
	PyBuffer_Release(&nodes);
	PyBuffer_Release(&out);
	PyBuffer_Release(&keys);
	return ret;
}

static PyMethodDef methods[] = {
	{"take_reports", take_reports, METH_VARARGS,
	 "the page-fault tracer's samples in one perf ring, as access reports"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_perf_ring",
	"The page-fault tracer's ring read straight into access reports (see "
	"udamon.system.perf_tracepoint)",
	-1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__perf_ring(void)
{
	return PyModule_Create(&module);
}
