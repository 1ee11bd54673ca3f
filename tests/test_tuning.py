"""Interval auto-tuning against the kernel's own code.

The functions below are copied from mm/damon/core.c of Linux 7.3
(damon_feed_loop_next_input, damon_get_intervals_score,
damon_get_intervals_adaptation_bp, the arithmetic of kdamond_tune_intervals),
compiled with gcc, and run on the same inputs as udamon's tuned_sample_us: the
results must be equal, value for value.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from udamon.core.attrs import IntervalsGoal
from udamon.core.monitor import _feed_loop_next_input, tuned_sample_us

KERNEL_C = r"""
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#define max(a, b) ((a) > (b) ? (a) : (b))
#define min(a, b) ((a) < (b) ? (a) : (b))
#define mult_frac(x, n, d) ({ typeof(x) q = (x) / (d); typeof(x) r = (x) % (d); \
                              (q * (n)) + ((r * (n)) / (d)); })

/* mm/damon/core.c, Linux 7.3 */
static unsigned long damon_feed_loop_next_input(unsigned long last_input,
		unsigned long score)
{
	const unsigned long goal = 10000;
	const unsigned long min_input = 10000;
	unsigned long score_goal_diff, compensation;
	int over_achieving = score > goal;

	if (score == goal)
		return last_input;
	if (score >= goal * 2)
		return min_input;
	if (over_achieving)
		score_goal_diff = score - goal;
	else
		score_goal_diff = goal - score;
	if (last_input < ULONG_MAX / score_goal_diff)
		compensation = last_input * score_goal_diff / goal;
	else
		compensation = last_input / goal * score_goal_diff;
	if (over_achieving)
		return max(last_input - compensation, min_input);
	if (last_input < ULONG_MAX - compensation)
		return last_input + compensation;
	return ULONG_MAX;
}

/* stdin: sample_us aggr_samples access_bp min_us max_us nr, then nr x (size nr_accesses);
 * or "f last score" for damon_feed_loop_next_input alone.
 * stdout: the new sample interval, or -1 when kdamond_tune_intervals changes nothing */
int main(void)
{
	char kind[2];
	while (scanf("%1s", kind) == 1) {
		if (kind[0] == 'f') {
			unsigned long last, score;
			if (scanf("%lu %lu", &last, &score) != 2)
				return 2;
			printf("%lu\n", damon_feed_loop_next_input(last, score));
			continue;
		}
		unsigned long sample, aggr_samples, goal_bp, min_us, max_us, nr;
		if (scanf("%lu %lu %lu %lu %lu %lu", &sample, &aggr_samples, &goal_bp, &min_us,
			&max_us, &nr) != 6)
			return 2;
		unsigned long max_access_events = 0, access_events = 0;
		for (unsigned long i = 0; i < nr; i++) {
			unsigned long sz, acc;
			if (scanf("%lu %lu", &sz, &acc) != 2)
				return 2;
			max_access_events += sz * aggr_samples;  /* damon_get_intervals_score */
			access_events += sz * acc;
		}
		unsigned long target = max_access_events * goal_bp / 10000;
		target = target ? : 1;
		unsigned long score_bp = mult_frac(access_events, 10000, target);
		/* damon_get_intervals_adaptation_bp */
		unsigned long adaptation_bp = damon_feed_loop_next_input(100000000, score_bp) / 10000;
		if (adaptation_bp <= 10000)
			adaptation_bp = 5000 + adaptation_bp / 2;
		/* kdamond_tune_intervals */
		if (adaptation_bp == 10000) {
			printf("-1\n");
			continue;
		}
		unsigned long s = min(max_us, sample * adaptation_bp / 10000);
		printf("%lu\n", max(min_us, s));
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the kernel's tuning code")
    d = tmp_path_factory.mktemp("tune")
    (d / "tune.c").write_text(KERNEL_C)
    subprocess.run([gcc, "-O2", "-o", str(d / "tune"), str(d / "tune.c")], check=True,
                   capture_output=True)
    return str(d / "tune")


def _run(binary: str, text: str) -> list[int]:
    out = subprocess.run([binary], input=text, capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


def test_feed_loop_next_input_matches_the_kernel(kernel):
    rng = np.random.default_rng(0)
    cases = [(100_000_000, s) for s in range(0, 25_000, 7)]
    cases += [(int(a), int(b)) for a, b in zip(rng.integers(10_000, 1 << 62, 2000),
                                               rng.integers(0, 30_000, 2000), strict=True)]
    cases += [((1 << 64) - 1, 5000), ((1 << 63), 19_999), (10_000, 10_001)]
    want = _run(kernel, "".join(f"f {a} {b}\n" for a, b in cases))
    assert [_feed_loop_next_input(a, b) for a, b in cases] == want


def test_interval_tuning_matches_kdamond_tune_intervals(kernel):
    """Random region lists, goals and intervals: udamon's next sampling interval is the
    kernel's, including 'unchanged' when the score meets the goal."""
    rng = np.random.default_rng(1)
    text, cases = [], []
    for i in range(3000):
        nr = int(rng.integers(1, 40))
        aggr = int(rng.integers(1, 200))
        sizes = (rng.integers(1, 1 << 20, nr) * 4096).astype(np.int64)
        acc = rng.integers(0, aggr + 1, nr) if i % 3 else np.zeros(nr, np.int64)
        bp = int(rng.integers(1, 10_001))
        if i % 11 == 0:  # exactly on the goal: half the samples accessed, goal 50%
            aggr = 2 * (aggr // 2 + 1)
            acc = np.full(nr, aggr // 2)
            bp = 5000
        goal = IntervalsGoal(access_bp=bp, aggrs=1,
                             min_sample_us=int(rng.integers(1, 5000)),
                             max_sample_us=int(rng.integers(5000, 10_000_000)))
        sample = int(rng.integers(1, 1_000_000))
        cases.append((sample, aggr, sizes, acc, goal))
        text.append(f"t {sample} {aggr} {goal.access_bp} {goal.min_sample_us} "
                    f"{goal.max_sample_us} {nr} "
                    + " ".join(f"{s} {a}" for s, a in zip(sizes, acc, strict=True)) + "\n")
    want = _run(kernel, "".join(text))
    got = [tuned_sample_us(*c) for c in cases]
    assert [-1 if g is None else g for g in got] == want
    assert any(g is None for g in got) and len({g for g in got if g}) > 100
