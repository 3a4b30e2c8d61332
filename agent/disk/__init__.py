"""On-disk formats the agent reads and writes: GPT, MBR and a small FAT, in one place.

Used by the writer (moving the backup GPT), drift (which sectors are tables), the
seed (a cidata partition and its FAT) and erase (where partitions start). Decisions
are pure code on bytes; the I/O is a few preads and pwrites on a descriptor the caller opened.
"""
