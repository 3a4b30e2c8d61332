"""The errors of the disk-format package (agent/errors.py draws the whole tree).

DiskError                   the package's root
└── SeedError               a NoCloud seed cannot be written
    ├── TableError          no table, a damaged one, or no free entry for one more partition
    ├── NoSpace             too little free space at the end of the disk
    └── SeedTooLarge        the files do not fit the seed filesystem
└── EfiBootError            a UEFI boot entry cannot be made (agent.disk.efiboot)
    └── EfiVarsError        efivarfs cannot be read or written (agent.runtime.efivars)
"""

from __future__ import annotations

from agent.errors import SledgeError


class DiskError(SledgeError):
    """On-disk tables or filesystems that cannot be read or written as asked."""


class SeedError(DiskError):
    pass


class TableError(SeedError):
    pass


class NoSpace(SeedError):
    pass


class SeedTooLarge(SeedError):
    pass
