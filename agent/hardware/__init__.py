"""What the machine is (inventory) and which disk to write (root device hints)."""
