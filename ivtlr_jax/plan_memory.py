"""Where a compiled step's peak memory goes, from XLA's own buffer analysis.

The step is compiled with XLA's dumps on (into a temporary folder): its live-range report lists the buffers
live at the peak, and the optimized HLO names the instruction that defines each, with the op metadata JAX
wrote (the `jax.named_scope`s of `latent.SCOPES`, which the backward pass keeps inside `transpose(...)`).
Each peak buffer goes to one part:

- `arguments`: parameters, optimizer state and the batch (the step's inputs);
- a part of the loss (`latent.SCOPES`: embeddings and vision tower, shared prefix, latent chain, final pass,
  loss), forward or backward;
- `f32 copies for CPU dots`: the CPU compiler computes bf16 dots in fp32 and inserts conversions of their
  bf16 operands (weights hoisted out of the layer loop, saved activations); a GPU multiplies bf16 natively
  and holds none of them, so `gpu_estimate_bytes` leaves them out (the bf16 originals stay counted);
  A buffer the compiler made without a scope goes where its source goes, or, when it is the initial value of a
  loop's carry (the stacked activations a layer loop saves for the backward pass start as a broadcast the loop
  writes into), where the loop goes;
- `other`: what carries no scope (the optimizer update, gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

from .latent import SCOPES

DUMP_OPTIONS = {"xla_dump_hlo_as_text": True, "xla_dump_hlo_pass_re": "^$"}  # the optimized module only
ARGUMENTS, CPU_COPIES, OTHER = "arguments", "f32 copies for CPU dots", "other"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_CALL = re.compile(r"^ ?([\w\-]+)\(([^)]*)\)(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s*([\w.\-]+)\{([^}]*)\}: (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class Instruction:
    dtype: str  # "f32", "bf16", ... ("(" for a tuple)
    opcode: str
    operands: tuple[str, ...]
    op_name: str  # JAX's op metadata ("" where the compiler made the instruction)
    index: str = ""  # a get-tuple-element's tuple index


@dataclasses.dataclass
class MemoryBreakdown:
    """Bytes live at the peak, by part (module docstring). bf16_sources: the bytes of the bf16 values that
    the peak's CPU-only copies convert and that are not live at the peak themselves (a GPU would hold those
    instead of their f32 copies)."""

    parts: dict[str, int]
    bf16_sources: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def gpu_estimate_bytes(self) -> int:
        return self.peak_bytes - self.parts.get(CPU_COPIES, 0) + self.bf16_sources

    def lines(self) -> list[str]:
        gb = lambda v: f"{v / 1e9:7.2f} GB"  # noqa: E731
        rows = sorted(self.parts.items(), key=lambda kv: -kv[1])
        out = [f"    {part:<34} {gb(size)} ({size / max(self.peak_bytes, 1):5.1%})" for part, size in rows]
        return out + [f"    {'peak (XLA CPU)':<34} {gb(self.peak_bytes)}",
                      f"    {'peak without the CPU-only copies':<34} {gb(self.gpu_estimate_bytes)} (a GPU's estimate)"]


def compile_with_breakdown(lowered, options: dict) -> tuple[object, MemoryBreakdown]:
    """Compile `lowered` with `options` plus XLA's dumps -> (the compiled step, its peak breakdown)."""
    with tempfile.TemporaryDirectory(prefix="ivtlr-plan-") as folder:
        compiled = lowered.compile({**options, **DUMP_OPTIONS, "xla_dump_to": folder})
        hlo = _one(folder, "*after_optimizations.txt").read_text()
        live = _one(folder, "*after_optimizations-live-range.txt").read_text()
    return compiled, peak_breakdown(hlo, live)


def _one(folder: str, pattern: str) -> Path:
    found = sorted(Path(folder).glob(pattern), key=lambda p: p.stat().st_size)
    if not found:
        raise RuntimeError(f"XLA wrote no {pattern} (its dump options changed?)")
    return found[-1]  # the step's module (the largest, should the compile dump helpers too)


def peak_breakdown(hlo_text: str, live_range_text: str) -> MemoryBreakdown:
    """The buffers of the live-range report's peak, grouped by part (module docstring)."""
    instructions = parse_instructions(hlo_text)
    buffers = peak_buffers(live_range_text)
    live = {(name, index) for name, index, _ in buffers}
    loops = loop_inits(instructions)
    parts: dict[str, int] = {}
    bf16_sources = 0
    for name, _, size in buffers:
        part = part_of(name, instructions, loops)
        parts[part] = parts.get(part, 0) + size
        if part == CPU_COPIES and buffer_of(instructions[name].operands[0], instructions) not in live:
            bf16_sources += size // 2
    return MemoryBreakdown(parts, bf16_sources)


def peak_buffers(live_range_text: str) -> list[tuple[str, str, int]]:
    """(instruction name, tuple index or "", bytes) of each buffer live at the peak."""
    lines = live_range_text.splitlines()
    start = next((i for i, line in enumerate(lines) if _PEAK.match(line)), None)
    if start is None:
        raise RuntimeError("XLA's live-range report has no peak section")
    out = []
    for line in lines[start + 1:]:
        match = _LIVE.match(line)
        if not match:
            break
        out.append((match[1], match[2], int(match[3])))
    return out


def buffer_of(name: str, instructions: dict[str, Instruction]) -> tuple[str, str]:
    """The buffer a value lives in, as the live-range report names it: (instruction, tuple index); a
    get-tuple-element's value lives in its tuple's buffer."""
    ins = instructions.get(name)
    if ins is not None and ins.opcode == "get-tuple-element" and ins.operands:
        return ins.operands[0], ins.index
    return name, ""


def parse_instructions(hlo_text: str) -> dict[str, Instruction]:
    """name -> Instruction, for every instruction of the optimized HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        shape_end = _shape_end(rest)
        call = _CALL.match(rest[shape_end:])
        if call is None:
            continue
        opcode, operands, tail = call.groups()
        op_name, index = _OP_NAME.search(tail), re.search(r"\bindex=(\d+)", tail)
        out[name] = Instruction("(" if rest.startswith("(") else rest.partition("[")[0], opcode,
                                tuple(o.strip().lstrip("%") for o in operands.split(",") if o.strip()),
                                op_name[1] if op_name else "", index[1] if index and opcode == "get-tuple-element"
                                else "")
    return out


def _shape_end(text: str) -> int:
    """The index just past the result shape at the start of an instruction's right-hand side: a plain shape
    with its layout (`f32[2,3]{1,0}`), or a tuple of them (parentheses, matched)."""
    if not text.startswith("("):
        return len(text.split(" ", 1)[0])
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i + 1
    return len(text)


def loop_inits(instructions: dict[str, Instruction]) -> dict[str, str]:
    """name -> the op_name of the `while` loop whose initial carry (a `tuple` operand) holds that value."""
    out = {}
    for ins in instructions.values():
        carry = instructions.get(ins.operands[0]) if ins.opcode == "while" and ins.operands else None
        if carry is not None and carry.opcode == "tuple" and ins.op_name:
            out.update({operand: ins.op_name for operand in carry.operands})
    return out


def part_of(name: str, instructions: dict[str, Instruction], loops: dict[str, str] | None = None) -> str:
    """The part a buffer goes to (module docstring); `loops`: `loop_inits(instructions)`."""
    loops = loops or {}
    ins = instructions.get(name)
    if ins is None:
        return OTHER
    if ins.opcode == "parameter":
        return ARGUMENTS
    if is_cpu_copy(name, ins, instructions):
        return CPU_COPIES
    for _ in range(8):  # a copy the compiler made (no metadata) belongs where its source does
        source = instructions.get(ins.operands[0]) if ins.operands else None
        if ins.op_name or ins.opcode not in ("copy", "bitcast") or source is None:
            break
        ins = source
    op_name = ins.op_name or loops.get(name, "")
    scope = next((s for s in SCOPES if re.search(rf"(^|[/(]){s}([/)]|$)", op_name)), None)
    if scope is None:
        return OTHER
    return f"{scope} ({'backward' if 'transpose(' in op_name else 'forward'})"


def is_cpu_copy(name: str, ins: Instruction, instructions: dict[str, Instruction]) -> bool:
    """A conversion of a bf16 value into f32 that the CPU compiler inserted for its dots: a convert without
    JAX's metadata, or a lone one that XLA CPU wrapped in a fusion (named wrapped_convert*); not the program's
    own `astype` (its metadata ends in convert_element_type), which a GPU makes too."""
    if ins.dtype != "f32" or len(ins.operands) != 1 or ins.op_name.endswith("convert_element_type"):
        return False
    source = instructions.get(ins.operands[0])
    inserted = (ins.opcode == "convert" and not ins.op_name) or (
        ins.opcode == "fusion" and name.startswith("wrapped_convert"))
    return inserted and source is not None and source.dtype == "bf16"
