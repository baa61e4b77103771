"""Host-memory measures for the sharing tests (client and vLLM)."""

from __future__ import annotations


def shmem_kb() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    raise RuntimeError("no Shmem in /proc/meminfo")


def pss_of_files_under(pid: int, directory: str) -> int:
    """Pss (kB) of every mapping of a file under ``directory`` in process ``pid``."""
    total, counting = 0, False
    for line in open(f"/proc/{pid}/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            counting = len(fields) >= 6 and fields[5].startswith(directory)
        elif counting and fields[0] == "Pss:":
            total += int(fields[1])
    return total
