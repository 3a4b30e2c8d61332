"""The errors of the disk-format package.

SeedError                   a NoCloud seed cannot be written (the tree is drawn in agent.runtime.seed)
├── TableError              no table, a damaged one, or no free entry for one more partition
├── NoSpace                 too little free space at the end of the disk
└── SeedTooLarge            the files do not fit the seed filesystem
"""

from __future__ import annotations


class SeedError(Exception):
    pass


class TableError(SeedError):
    pass


class NoSpace(SeedError):
    pass


class SeedTooLarge(SeedError):
    pass
