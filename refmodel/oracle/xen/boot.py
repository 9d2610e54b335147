"""Boot the refmodel Xen test kernel as dom0 of a real Xen 4.17 under QEMU (TCG),
run a :mod:`.program` in it and parse what it prints.

The kernel (``kernel/head.S``, ``kernel/main.c``, ``kernel/link.lds``) is built with
the system's gcc and ld, and the address constants of :mod:`.program` are passed to
it as ``-D`` flags, so the two cannot disagree. Builds and the unpacked Xen image are
cached under ``$REFMODEL_XEN_CACHE`` (default ``$XDG_CACHE_HOME/refmodel/xen`` or
``~/.cache/refmodel/xen``), keyed by a hash of the sources and flags.

Needs: ``apt-get install -y qemu-system-x86 xen-hypervisor-4.17-amd64 gcc``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import RefmodelError
from . import program as prog
from .layout import Dom0Layout, TableDump

XEN_GZ = Path("/boot/xen-4.17-amd64.gz")
QEMU = "qemu-system-x86_64"
INSTALL = "apt-get install -y qemu-system-x86 xen-hypervisor-4.17-amd64 gcc"
KERNEL_DIR = Path(__file__).parent / "kernel"
SOURCES = ("head.S", "main.c", "link.lds")
CFLAGS = (
    "-O1", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-mno-red-zone",
    "-fno-stack-protector", "-mcmodel=large", "-mgeneral-regs-only", "-nostdlib",
    "-static", "-Wall", "-Werror",
)
LDFLAGS = ("-nostdlib", "-static", "-z", "noexecstack")
QEMU_ARGS = (
    "-accel", "tcg", "-cpu", "max", "-m", "512", "-display", "none", "-serial", "stdio",
    "-monitor", "none", "-no-reboot",
)
XEN_CMDLINE = "console=com1 com1=115200,8n1 dom0_mem=64M loglvl=all guest_loglvl=all"
CONSOLE_TAIL = 40


class XenHarnessError(RefmodelError):
    """Building, booting or running a program in the Xen test kernel went wrong."""


@dataclass(frozen=True)
class OpResult:
    """What one program operation gave. Hypercalls: ``ret``, ``done`` (mmu_update,
    mmuext_op) and ``results`` (multicall entries). Accesses: ``outcome`` 'ok', 'pf'
    or 'gp', ``value`` (read), ``cr2`` (#PF) and ``error_code`` (faults)."""

    index: int
    ret: int | None = None
    done: int | None = None
    results: tuple[int, ...] | None = None
    outcome: str | None = None
    value: int | None = None
    cr2: int | None = None
    error_code: int | None = None


@dataclass(frozen=True)
class BootRecord:
    """What a boot of the test kernel reported (see :mod:`.program` for the lines)."""

    nr_pages: int
    pt_base: int
    boot_l4: int
    boot_l3: int
    foreign: tuple[int, ...]
    p2m: tuple[int, ...]
    tables: tuple[TableDump, ...]
    results: tuple[OpResult, ...]
    console: str
    shared_info: int  #: start_info.shared_info (a machine address)
    #: the crash or error line that stopped the kernel before the program's end
    #: (only with ``allow_abort``; ``results`` then holds the operations finished)
    aborted: str | None = None

    def layout(self) -> Dom0Layout:
        """dom0 as the boot left it, as the model's initial state needs it."""
        return Dom0Layout(self.p2m, self.foreign, self.boot_l4, self.boot_l3, self.tables)

    def frame_map(self) -> prog.FrameMap:
        return self.layout().frame_map()

    def table(self, mfn: int) -> TableDump:
        for t in self.tables:
            if t.mfn == mfn:
                return t
        raise XenHarnessError(f"frame {mfn:#x} is not a dumped boot page table")


def available() -> str | None:
    """None when QEMU, Xen 4.17 and gcc are installed; else why not (one line)."""
    missing = [name for name, ok in (
        (QEMU, shutil.which(QEMU) is not None),
        (str(XEN_GZ), XEN_GZ.is_file()),
        ("gcc", shutil.which("gcc") is not None),
        ("ld", shutil.which("ld") is not None),
    ) if not ok]
    if missing:
        return f"Xen oracle needs {', '.join(missing)}: {INSTALL}"
    return None


def cache_dir() -> Path:
    env = os.environ.get("REFMODEL_XEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "refmodel" / "xen"


def _defines() -> list[str]:
    consts = {
        "KERNEL_BASE": prog.KERNEL_BASE, "SCRATCH_VA": prog.SCRATCH_VA, "MASK_VA": prog.MASK_VA,
        "VCPU_INFO_VA": prog.VCPU_INFO_VA, "FOREIGN_BASE": prog.FOREIGN_BASE,
        "NR_FOREIGN": prog.NR_FOREIGN, "SYM_BOOT_L4": prog.SYM_BOOT_L4, "SYM_BOOT_L3": prog.SYM_BOOT_L3,
    }
    return [f"-D{k}={v:#x}" for k, v in consts.items()]


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise XenHarnessError(f"{what} failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")


def build_kernel() -> Path:
    """The test kernel's ELF, built (or found in the cache) from the packaged sources."""
    reason = available()
    if reason is not None:
        raise XenHarnessError(reason)
    h = hashlib.sha256()
    for flag in (*CFLAGS, *LDFLAGS, *_defines()):
        h.update(flag.encode() + b"\0")
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (KERNEL_DIR / name).read_bytes())
    out_dir = cache_dir() / f"kernel-{h.hexdigest()[:16]}"
    elf = out_dir / "kernel.elf"
    if elf.is_file():
        return elf
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        t = Path(tmp)
        defs = _defines()
        for src, obj in (("head.S", "head.o"), ("main.c", "main.o")):
            _run(["gcc", *CFLAGS, *defs, "-c", str(KERNEL_DIR / src), "-o", str(t / obj)], f"compiling {src}")
        _run(["cpp", "-P", "-undef", *defs, str(KERNEL_DIR / "link.lds"), "-o", str(t / "link.lds")],
             "preprocessing link.lds")
        _run(["ld", "-T", str(t / "link.lds"), *LDFLAGS, str(t / "head.o"), str(t / "main.o"), "-o", str(t / "kernel.elf")],
             "linking the kernel")
        os.makedirs(out_dir, exist_ok=True)
        os.replace(t / "kernel.elf", elf)
    return elf


def xen_image() -> Path:
    """Xen's plain ELF image (QEMU's multiboot loader does not take the .gz)."""
    reason = available()
    if reason is not None:
        raise XenHarnessError(reason)
    st = XEN_GZ.stat()
    path = cache_dir() / f"xen-{st.st_size}-{int(st.st_mtime)}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with gzip.open(XEN_GZ, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)
    return path


def _tail(console: str) -> str:
    return "\n".join(console.splitlines()[-CONSOLE_TAIL:])


def _fail(message: str, console: str) -> XenHarnessError:
    return XenHarnessError(f"{message}\n--- last {CONSOLE_TAIL} console lines ---\n{_tail(console)}")


def boot(program: bytes, timeout: float = 120, allow_abort: bool = False) -> BootRecord:
    """Boot Xen with the test kernel running ``program`` (:func:`.program.encode`).
    With ``allow_abort``, a kernel that stops in the middle of the program (a crash
    line) gives the record of the operations it finished, ``aborted`` saying why."""
    kernel = build_kernel()
    xen = xen_image()
    with tempfile.TemporaryDirectory(prefix="refmodel-xen-") as tmp:
        bin_path = Path(tmp) / "program.bin"
        bin_path.write_bytes(program)
        cmd = [QEMU, *QEMU_ARGS, "-kernel", str(xen), "-initrd", f"{kernel},{bin_path}",
               "-append", XEN_CMDLINE]
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            raise _fail(f"QEMU did not finish within {timeout:g} s", out) from None
    console = r.stdout.decode(errors="replace").replace("\r", "")
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise _fail(f"QEMU exited with {r.returncode}: {err[-1] if err else ''}", console)
    return parse(console, expected_ops=_count_ops(program), allow_abort=allow_abort)


def _count_ops(program: bytes) -> int | None:
    if len(program) >= 16 and program[:8] == prog.MAGIC:
        return int.from_bytes(program[8:16], "little")
    return None


_START = re.compile(r"XP start nr_pages=(\d+) pt_base=(\S+) l4=(\S+) l3=(\S+) shinfo=(\S+)$")
_RESULT = re.compile(r"R (\d+) (.*)$")


def _hex(s: str) -> int:
    return int(s, 16)


def _result(index: int, rest: str) -> OpResult:
    words = rest.split()
    kv = dict(w.split("=", 1) for w in words if "=" in w)
    if words[0].startswith("ret="):
        results = None
        if "results" in kv:
            results = tuple(int(x) for x in kv["results"].split(",") if x)
        return OpResult(index, ret=int(kv["ret"]), done=int(kv["done"]) if "done" in kv else None,
                        results=results)
    if words[0] == "ok":
        return OpResult(index, outcome="ok", value=_hex(kv["value"]) if "value" in kv else None)
    if words[0] == "pf":
        return OpResult(index, outcome="pf", cr2=_hex(kv["cr2"]), error_code=_hex(kv["ec"]))
    if words[0] == "gp":
        return OpResult(index, outcome="gp", error_code=_hex(kv["ec"]))
    raise ValueError(rest)


def parse(console: str, expected_ops: int | None = None, allow_abort: bool = False) -> BootRecord:
    """The boot record in the kernel's console output (see :mod:`.program`)."""
    start: re.Match[str] | None = None
    foreign: dict[int, int] = {}
    p2m: list[int] = []
    tables: list[tuple[int, int, list[tuple[int, int]]]] = []
    results: list[OpResult] = []
    end: int | None = None
    ready = False
    aborted: str | None = None
    for line in console.splitlines():
        if line.startswith(("XP crash", "XP error")):
            if not (allow_abort and ready):
                raise _fail(f"the test kernel reported: {line}", console)
            aborted = line  # the results so far still count: the caller checks them
            break
        try:
            if line.startswith("XP start "):
                start = _START.match(line)
                if start is None:
                    raise ValueError(line)
            elif line.startswith("XP foreign "):
                _, _, k, mfn = line.split()
                foreign[int(k)] = _hex(mfn)
            elif line.startswith("XP p2m "):
                _, _, g, n, mfn = line.split()
                if _hex(g) != len(p2m):
                    raise ValueError(line)
                p2m.extend(_hex(mfn) + i for i in range(int(n)))
            elif line.startswith("XP table "):
                _, _, level, mfn = line.split()
                tables.append((int(level), _hex(mfn), []))
            elif line.startswith("XP run "):
                _, _, mfn, slot, n, entry = line.split()
                if not tables or tables[-1][1] != _hex(mfn):
                    raise ValueError(line)
                tables[-1][2].extend((int(slot) + i, _hex(entry) + i * 0x1000) for i in range(int(n)))
            elif line == "XP ready":
                ready = True
            elif line.startswith("XP end "):
                end = int(line.split()[2])
            elif ready and end is None and (m := _RESULT.match(line)):
                results.append(_result(int(m.group(1)), m.group(2)))
        except (ValueError, KeyError, IndexError):
            raise _fail(f"unparsable console line: {line!r}", console) from None
    if start is None or not ready:
        raise _fail("the test kernel did not report its boot", console)
    if aborted is not None:
        end = len(results)
    if end is None:
        raise _fail("no 'XP end' line: the kernel did not finish the program", console)
    if [r.index for r in results] != list(range(end)) or (
        aborted is None and expected_ops is not None and end != expected_ops
    ):
        raise _fail(f"{len(results)} results for a program of {expected_ops if expected_ops is not None else end}"
                    " operations", console)
    nr_pages = int(start.group(1))
    if len(p2m) != nr_pages or sorted(foreign) != list(range(len(foreign))):
        raise _fail("the P2M or the foreign frames are incomplete", console)
    return BootRecord(
        nr_pages=nr_pages, pt_base=_hex(start.group(2)), boot_l4=_hex(start.group(3)),
        boot_l3=_hex(start.group(4)), shared_info=_hex(start.group(5)),
        foreign=tuple(foreign[k] for k in range(len(foreign))), p2m=tuple(p2m),
        tables=tuple(TableDump(lv, mfn, tuple(es)) for lv, mfn, es in tables),
        results=tuple(results), console=console, aborted=aborted,
    )


__all__ = ["BootRecord", "OpResult", "TableDump", "XenHarnessError", "available", "boot", "build_kernel",
           "cache_dir", "parse", "xen_image"]
