"""Decode Arm SPE (Statistical Profiling Extension) records from a perf AUX area.

SPE does not produce PERF_RECORD_SAMPLE: the hardware writes packet streams into
the event's AUX buffer and perf announces new data with PERF_RECORD_AUX.  A
record is a sequence of packets ending with an END or a TIMESTAMP packet.  The
packet encoding follows the Arm ARM (DDI 0487, "Statistical Profiling
Extension") as decoded by the kernel tree's
tools/perf/util/arm-spe-decoder/arm-spe-pkt-decoder.c:

* header byte 0x00 PAD, 0x01 END, 0x71 TIMESTAMP (8-byte payload);
* ``h & 0xcf == 0x42`` EVENTS, ``== 0x43`` DATA SOURCE (payload size in bits 5:4);
* ``h & 0xfc == 0x64`` CONTEXT, ``== 0x48`` OP TYPE (class in bits 1:0);
* ``h & 0xfc == 0x20`` extended header: a second byte, 0x00 = alignment padding,
  else an ADDRESS/COUNTER header with a 5-bit index;
* ``h & 0xf8 == 0xb0`` ADDRESS (index 2 = data virtual address; bits 55:0),
  ``== 0x98`` COUNTER (index 0 = total latency).

What udamon keeps per record: the data virtual address, load or store (OP TYPE
class 1, bit 0), the events (L1D/L2D/LLC access and miss, remote access) turned
into a memory level, the total latency, and the CONTEXT packet's value (the
thread id when the kernel has CONFIG_PID_IN_CONTEXTIDR).  Not exercised on
hardware here: tested on constructed packet streams (tests/test_pmu.py).
"""

from __future__ import annotations

import numpy as np

from udamon.intake.reports import MEM_IDS

SPE_DTYPE = np.dtype([("addr", np.uint64), ("is_ldst", np.bool_), ("store", np.bool_),
                      ("events", np.uint64), ("latency", np.uint32), ("context", np.int64),
                      ("level", np.uint8), ("timestamp", np.uint64)])

EV_L1D_ACCESS, EV_L1D_REFILL, EV_LLC_ACCESS, EV_LLC_MISS, EV_REMOTE_ACCESS = 2, 3, 8, 9, 10
EV_L2D_ACCESS, EV_L2D_MISS = 19, 20
ADDR_INDEX_DATA_VIRT = 2
COUNTER_INDEX_TOTAL_LAT = 0
OP_CLASS_LD_ST_ATOMIC = 1


def _bit(ev: int, n: int) -> bool:
    return bool(ev >> n & 1)


def level_of(events: int) -> int:
    """Memory level from the EVENTS packet (the data source packet is implementation
    defined, so it is not used)."""
    if _bit(events, EV_REMOTE_ACCESS):
        return MEM_IDS["remote-ram"] if _bit(events, EV_LLC_MISS) else MEM_IDS["remote-cache"]
    if _bit(events, EV_LLC_MISS):
        return MEM_IDS["ram"]
    if _bit(events, EV_L1D_ACCESS) and not _bit(events, EV_L1D_REFILL):
        return MEM_IDS["cache"]
    if _bit(events, EV_L2D_ACCESS) and not _bit(events, EV_L2D_MISS):
        return MEM_IDS["cache"]
    if _bit(events, EV_LLC_ACCESS):
        return MEM_IDS["cache"]
    return MEM_IDS["unknown"]


class SpeDecoder:
    """Packets -> records; keeps a record cut at the end of one chunk for the next."""

    def __init__(self) -> None:
        self.bad_packets = 0
        self._rest = b""

    def decode(self, data: bytes) -> np.ndarray:
        buf = self._rest + data
        out: list[tuple] = []
        cur = _new()
        i = 0
        n = len(buf)
        start = 0  # where the record being built started
        while i < n:
            h = buf[i]
            if h == 0x00:  # PAD
                i += 1
                continue
            if h == 0x01:  # END
                out.append(_finish(cur))
                cur = _new()
                i += 1
                start = i
                continue
            if h == 0x71:  # TIMESTAMP ends a record
                if i + 9 > n:
                    break
                cur["timestamp"] = int.from_bytes(buf[i + 1: i + 9], "little")
                out.append(_finish(cur))
                cur = _new()
                i += 9
                start = i
                continue
            ext = 0
            hdr = h
            if h & 0xFC == 0x20:  # extended header
                if i + 1 >= n:
                    break
                hdr = buf[i + 1]
                if hdr == 0x00:  # alignment padding
                    align = 1 << ((h & 0xF) + 1)
                    i = (i + align) & ~(align - 1)
                    continue
                ext = 1
            size = 1 << ((hdr >> 4) & 3)
            if i + 1 + ext + size > n:
                break  # the rest of this record comes with the next chunk
            payload = int.from_bytes(buf[i + 1 + ext: i + 1 + ext + size], "little")
            if not ext and h & 0xCF == 0x42:  # EVENTS
                cur["events"] = payload
            elif not ext and h & 0xCF == 0x43:  # DATA SOURCE (implementation defined)
                pass
            elif not ext and h & 0xFC == 0x64:  # CONTEXT
                cur["context"] = payload
            elif not ext and h & 0xFC == 0x48:  # OP TYPE
                if h & 3 == OP_CLASS_LD_ST_ATOMIC:
                    cur["is_ldst"] = True
                    cur["store"] = bool(payload & 1)
            elif hdr & 0xF8 == 0xB0:  # ADDRESS
                index = ((h & 3) << 3 | (hdr & 7)) if ext else (hdr & 7)
                if index == ADDR_INDEX_DATA_VIRT:
                    addr = payload & ((1 << 56) - 1)
                    if (addr >> 48) & 0xF0 == 0xF0:  # a kernel address: top byte 0xff
                        addr |= 0xFF << 56
                    cur["addr"] = addr
            elif hdr & 0xF8 == 0x98:  # COUNTER
                index = ((h & 3) << 3 | (hdr & 7)) if ext else (hdr & 7)
                if index == COUNTER_INDEX_TOTAL_LAT:
                    cur["latency"] = payload
            else:
                self.bad_packets += 1
                i += 1
                continue
            i += 1 + ext + size
        self._rest = buf[start:] if start < n else b""
        if not out:
            return np.zeros(0, dtype=SPE_DTYPE)
        return np.array(out, dtype=SPE_DTYPE)


def _new() -> dict:
    return {"addr": 0, "is_ldst": False, "store": False, "events": 0, "latency": 0,
            "context": -1, "timestamp": 0}


def _finish(r: dict) -> tuple:
    return (r["addr"], r["is_ldst"], r["store"], r["events"], r["latency"], r["context"],
            level_of(r["events"]), r["timestamp"])
