"""Decode perf's ``data_src`` (union perf_mem_data_src) into what udamon reports.

Precise memory samples (Intel PEBS, AMD IBS, Arm SPE as perf synthesises it) say
what kind of operation it was and where the data came from.  udamon keeps two
things per report: whether it was a store (``write``) and the memory level
(``mem``, an index into ``MEM_LEVELS``): the node-level split NUMA placement needs.

Bit layout (include/uapi/linux/perf_event.h, little-endian bitfields):
``mem_op`` 0-4, ``mem_lvl`` 5-18, ``mem_snoop`` 19-23, ``mem_lock`` 24-25,
``mem_dtlb`` 26-32, ``mem_lvl_num`` 33-36, ``mem_remote`` 37, ``mem_snoopx``
38-39, ``mem_blk`` 40-42, ``mem_hops`` 43-45.  The newer composite fields
(``mem_lvl_num`` + ``mem_remote`` + ``mem_hops``) win when set; the older
``mem_lvl`` bits are the fallback (kernels and CPUs that only fill those).
``mem_remote`` with ``mem_hops`` = 1 ("remote core, same node") is not another
node.
"""

from __future__ import annotations

import numpy as np

from udamon.intake.reports import MEM_IDS

OP_NA, OP_LOAD, OP_STORE, OP_PFETCH, OP_EXEC = 0x1, 0x2, 0x4, 0x8, 0x10
# mem_lvl bits
LVL_NA, LVL_HIT, LVL_MISS, LVL_L1, LVL_LFB, LVL_L2, LVL_L3 = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
LVL_LOC_RAM, LVL_REM_RAM1, LVL_REM_RAM2 = 0x80, 0x100, 0x200
LVL_REM_CCE1, LVL_REM_CCE2, LVL_IO, LVL_UNC = 0x400, 0x800, 0x1000, 0x2000
# mem_lvl_num values
LVLNUM_L1, LVLNUM_L2, LVLNUM_L3, LVLNUM_L4, LVLNUM_L2_MHB, LVLNUM_MSC, LVLNUM_L0 = range(1, 8)
LVLNUM_UNC, LVLNUM_CXL, LVLNUM_IO, LVLNUM_ANY_CACHE, LVLNUM_LFB = 8, 9, 10, 11, 12
LVLNUM_RAM, LVLNUM_PMEM, LVLNUM_NA = 13, 14, 15
HOPS_0 = 1  # remote core, same node

_CACHE_NUMS = (LVLNUM_L1, LVLNUM_L2, LVLNUM_L3, LVLNUM_L4, LVLNUM_L2_MHB, LVLNUM_MSC,
               LVLNUM_L0, LVLNUM_ANY_CACHE, LVLNUM_LFB)
_RAM_NUMS = (LVLNUM_RAM, LVLNUM_PMEM, LVLNUM_CXL)
_OTHER_NUMS = (LVLNUM_UNC, LVLNUM_IO)


def data_src_value(op: int = OP_NA, lvl: int = 0, lvl_num: int = 0, remote: int = 0,
                   hops: int = 0, snoop: int = 0x1, dtlb: int = 0x1, lock: int = 0x1,
                   blk: int = 0x1) -> int:
    """Compose a data_src value (for tests and constructed samples)."""
    return (op | lvl << 5 | snoop << 19 | lock << 24 | dtlb << 26 | lvl_num << 33
            | remote << 37 | blk << 40 | hops << 43)


def decode(data_src) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised: (is_store, is_load, mem level index) per data_src value."""
    ds = np.asarray(data_src, dtype=np.uint64)
    op = (ds & np.uint64(0x1F)).astype(np.int64)
    lvl = ((ds >> np.uint64(5)) & np.uint64(0x3FFF)).astype(np.int64)
    num = ((ds >> np.uint64(33)) & np.uint64(0xF)).astype(np.int64)
    remote = ((ds >> np.uint64(37)) & np.uint64(1)).astype(bool)
    hops = ((ds >> np.uint64(43)) & np.uint64(7)).astype(np.int64)
    other_node = remote & (hops != HOPS_0)

    level = np.full(ds.shape, MEM_IDS["unknown"], dtype=np.uint8)
    # older mem_lvl bits (lowest priority first: later assignments win)
    level[(lvl & (LVL_L1 | LVL_LFB | LVL_L2 | LVL_L3)) != 0] = MEM_IDS["cache"]
    level[(lvl & (LVL_IO | LVL_UNC)) != 0] = MEM_IDS["other"]
    level[(lvl & LVL_LOC_RAM) != 0] = MEM_IDS["ram"]
    level[(lvl & (LVL_REM_CCE1 | LVL_REM_CCE2)) != 0] = MEM_IDS["remote-cache"]
    level[(lvl & (LVL_REM_RAM1 | LVL_REM_RAM2)) != 0] = MEM_IDS["remote-ram"]
    # a miss at a level says where the data was not: only hits name a level
    level[((lvl & LVL_MISS) != 0) & ((lvl & LVL_HIT) == 0)] = MEM_IDS["unknown"]
    # the composite fields, when set, decide
    has_num = (num != 0) & (num != LVLNUM_NA)
    cache = has_num & np.isin(num, _CACHE_NUMS)
    ram = has_num & np.isin(num, _RAM_NUMS)
    level[cache] = np.where(other_node[cache], MEM_IDS["remote-cache"], MEM_IDS["cache"])
    level[ram] = np.where(other_node[ram], MEM_IDS["remote-ram"], MEM_IDS["ram"])
    level[has_num & np.isin(num, _OTHER_NUMS)] = MEM_IDS["other"]
    is_store = (op & OP_STORE) != 0
    is_load = (op & (OP_LOAD | OP_PFETCH)) != 0
    return is_store, is_load, level
