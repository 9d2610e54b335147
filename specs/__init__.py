"""Z3 specifications of refmodel's state, transitions and isolation invariants.

What is specified (each module's docstring cites the Xen source or SDM section it
follows):

- :mod:`.state` — the machine as Z3 terms: memory as 64-bit words indexed by entry
  address (frame ++ index), frame owners, PV page types and their validation and
  pins, the P2M/EPT, shadow metadata, the TLB with its tags (VPID, PCID, global) and a
  ghost "filled for", the vCPUs (running one, domain, VPID, base, PCID) and their
  registers (live, saved, and a ghost of what each must see);
- :mod:`.walks` — page walks: PV and shadow tables in machine frames, HAP guest
  tables composed with the EPT;
- the transitions — :mod:`.pv` (mmu_update, pin/unpin, NEW_BASEPTR, flushes,
  update_va_mapping, as Xen's get_page_type / store / put_page_type steps),
  :mod:`.shadow` (trap-and-emulate of a guest page-table write, shadow promotion,
  entry sync, CR3), :mod:`.p2m` (the hypervisor's EPT update), :mod:`.tlb` (fills
  from each kind of walk, A/D updates, guest stores through the TLB, INVLPG, MOV CR3,
  INVPCID, INVVPID), :mod:`.vcpu` (context switch, register writes);
- :mod:`.invariants` — six named isolation invariants, each a statement and an
  inductive core, with a concrete twin in :mod:`refmodel.hv.invariants`.

How it is checked:

- :mod:`.proofs` proves ``Config ∧ Core ∧ T ⇒ Core_I'`` for every transition T and
  invariant I, and ``Config ∧ Core ⇒ Statement_I`` for every I, for all states — no
  bound: quantifiers range over the full index sorts; :mod:`.prover` decides them by
  instantiation (the array property fragment procedure) and Z3 on the
  quantifier-free remainder. ``refmodel verify`` prints the table.
- :mod:`.concrete` abstracts a concrete refmodel machine as Z3 constants, so each
  transition can be evaluated on it and compared with the Python model (the tie
  tests, tests/test_specs_tie.py).
- :mod:`.negative` breaks one check per invariant; :mod:`.bounded` finds the
  counterexample over a small symbolic state; :mod:`.replay` turns it into
  operations the Python model replays (``refmodel verify --negative``,
  tests/test_specs_negative.py).
"""
