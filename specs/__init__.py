"""Z3 specifications of refmodel's state, transitions and isolation invariants."""
