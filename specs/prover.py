"""Deciding ``hypotheses ⇒ goal`` with quantified invariants, predictably.

Z3's own quantifier engine (E-matching, MBQI) struggles with these formulas: the
natural triggers are array reads at bit-vector indices built from other reads, and
MBQI wanders. The invariants are, however, in the shape the *array property
fragment* decision procedure handles (Bradley, Manna & Sipma, "What's Decidable
About Arrays?", VMCAI 2006): universally quantified index variables used to read
arrays. The procedure here follows it:

1. the goal's universal variables are replaced by fresh constants (Skolemization of
   its negation) and conjunctive goals are proved one conjunct at a time;
2. every ground index term — the index of any array read or write, collected by
   sort — is an instantiation candidate; each universally quantified hypothesis is
   instantiated at every candidate of its variables' sorts;
3. instances bring new index terms, so step 2 is repeated a few rounds;
4. the resulting quantifier-free problem (arrays and bit-vectors, decidable) goes to
   Z3.

Instantiating a universal hypothesis only adds its consequences, so *unsat* is a
proof of the original implication. *sat* means the instances did not suffice; the
model may be spurious and is never reported as a counterexample (negative controls
find theirs over a bounded state, :mod:`specs.negative`).

Step 4 is bounded by Z3's resource limit (``rlimit``: a count of solver work), not
by a wall-clock timeout, and every attempt has a fixed random seed: the answer is
the same on a quiet and on a loaded machine. (With wall-clock timeouts a proof that
takes 0.3 s quiet became "unknown" when other processes slowed it threefold.)
"""

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import z3
from z3 import z3core as C

from .words import Expr

#: Instantiation rounds: enough for every proof here (walks are built in full in the
#: goal; an instance adds at most one hop: a guest entry behind a shadow entry).
ROUNDS = 3
#: Z3 resource units (``rlimit``) per second of one core, as measured on the proofs
#: here (about 5 million): only to size the schedule below and to read it as time.
RLIMIT_PER_SECOND = 5_000_000


@dataclass(frozen=True)
class Answer:
    status: str  #: "proved" or "unknown"
    seconds: float  #: wall-clock
    instances: int
    cpu: float = 0.0  #: CPU time of this process (unaffected by other load on the machine)


def _conjuncts(e: Expr) -> list[Expr]:
    if z3.is_and(e):
        return [c for a in e.children() for c in _conjuncts(a)]
    return [e]


def skolemize(goal: Expr, tag: str) -> Expr:
    """The body of a (nested) universal goal with its variables replaced by fresh
    constants; a goal that is not a universal is returned as is."""
    n = 0
    while z3.is_quantifier(goal) and goal.is_forall():
        consts = [z3.Const(f"{tag}!{n + i}", goal.var_sort(i)) for i in range(goal.num_vars())]
        n += goal.num_vars()
        # de Bruijn: variable 0 is the last bound one
        goal = z3.substitute_vars(goal.body(), *reversed(consts))
    return goal


def _index_terms(formulas: Iterable[Expr], acc: dict[int, dict[int, Expr]], seen: set[int]) -> None:
    """Collect the index of every array read and write in the ground formulas (not
    inside quantifiers), keyed by the id of its sort; ``seen`` carries over between
    rounds. Walks the terms through Z3's C API: wrapping every sub-term in a Python
    object costs more than all the solving."""
    ctx = z3.main_ctx()
    c = ctx.ref()
    stack = [f.as_ast() for f in formulas]
    while stack:
        node = stack.pop()
        nid = C.Z3_get_ast_id(c, node)
        if nid in seen:
            continue
        seen.add(nid)
        if C.Z3_get_ast_kind(c, node) != C.Z3_APP_AST:
            continue
        app = C.Z3_to_app(c, node)
        kind = C.Z3_get_decl_kind(c, C.Z3_get_app_decl(c, app))
        nargs = C.Z3_get_app_num_args(c, app)
        if kind in _ARRAY_OPS:
            idx = C.Z3_get_app_arg(c, app, 1)
            sort_id = C.Z3_get_ast_id(c, C.Z3_sort_to_ast(c, C.Z3_get_sort(c, idx)))
            acc.setdefault(sort_id, {})[C.Z3_get_ast_id(c, idx)] = z3.ExprRef(idx, ctx)
        for i in range(nargs):
            stack.append(C.Z3_get_app_arg(c, app, i))


_ARRAY_OPS = (z3.Z3_OP_SELECT, z3.Z3_OP_STORE)


def _instances(q: Expr, terms: dict[int, dict[int, Expr]]) -> list[Expr]:
    """Every instance of the universal ``q`` at the collected terms of its sorts."""
    sorts = [q.var_sort(i) for i in range(q.num_vars())]
    pools = [list(terms.get(srt.get_id(), {}).values()) for srt in sorts]
    out = []
    for combo in product(*pools):
        body = z3.substitute_vars(q.body(), *reversed(combo))
        if z3.is_quantifier(body) and body.is_forall():
            out.extend(_instances(body, terms))
        else:
            out.append(body)
    return out


def _split(hyps: Sequence[Expr]) -> tuple[list[Expr], list[Expr]]:
    ground: list[Expr] = []
    quantified: list[Expr] = []
    for h in hyps:
        for c in _conjuncts(h):
            (quantified if z3.is_quantifier(c) and c.is_forall() else ground).append(c)
    return ground, quantified


def prove(
    hyps: Sequence[Expr], goal: Expr, tag: str = "sk", restarts: Sequence[tuple[int, int]] | None = None
) -> Answer:
    """Is ``hyps ⇒ goal`` valid? (see the module docstring)"""
    start, cpu = time.perf_counter(), time.process_time()
    ground, quantified = _split(hyps)
    total = 0
    goals = [skolemize(g, f"{tag}{i}") for i, g in enumerate(_conjuncts(goal))]
    for g in goals:
        negated = z3.simplify(z3.Not(g))
        facts = [z3.simplify(f) for f in ground] + [negated]
        terms: dict[int, dict[int, Expr]] = {}
        seen: set[int] = set()
        done: set[int] = set()
        for _ in range(ROUNDS):
            _index_terms(facts, terms, seen)
            new = []
            for q in quantified:
                for inst in _instances(q, terms):
                    inst = z3.simplify(inst)
                    if inst.get_id() not in done:
                        done.add(inst.get_id())
                        new.append(inst)
            if not new:
                break
            facts.extend(new)
        total += len(done)
        if not _refuted(facts, RESTARTS if restarts is None else restarts):
            return Answer("unknown", time.perf_counter() - start, total, time.process_time() - cpu)
    return Answer("proved", time.perf_counter() - start, total, time.process_time() - cpu)


#: Restart schedule: (resource limit, random seed). Solving times of these problems
#: are heavy-tailed in the seed (0.1 s with one, over 40 s with another), so short
#: runs with fresh seeds beat one long run. The limits are Z3 ``rlimit`` units,
#: deterministic where a timeout is not; together about 50 s of one core. Measured
#: on the full table: 454 of 466 goals are refuted by the first attempt, the
#: hardest by the seventh, with 7.5 million units; the last allows 150 million.
#: The rule: an attempt that answers *unsat* proves the goal; *sat* ends the
#: schedule ("unknown": the instances do not suffice); an attempt that exhausts its
#: limit hands over to the next; when the last one does, the goal is "unknown" —
#: reported as not proved, never retried further.
RESTARTS: tuple[tuple[int, int], ...] = tuple(
    (int(seconds * RLIMIT_PER_SECOND), seed)
    for seed, seconds in enumerate((0.3, 0.3, 0.6, 0.6, 1.2, 1.2, 2.5, 5, 10, 30))
)


#: One short attempt: for a first try with a subset of the hypotheses.
QUICK: tuple[tuple[int, int], ...] = ((4_000_000, 0),)


def _refuted(facts: Sequence[Expr], schedule: Sequence[tuple[int, int]]) -> bool:
    """Are the quantifier-free ``facts`` unsatisfiable? Tries the restart schedule of
    (rlimit, seed) attempts; a *sat* answer is final."""
    for rlimit, seed in schedule:
        solver = z3.SolverFor("QF_AUFBV")
        solver.set("rlimit", rlimit)
        solver.set("random_seed", seed)
        solver.add(*facts)
        answer = solver.check()
        if answer == z3.unsat:
            return True
        if answer == z3.sat:
            return False
    return False
    return False
