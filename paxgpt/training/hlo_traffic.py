"""What a compiled TPU program sends between slices, read from its HLO text.

A multi-slice TPU program moves what crosses slices (the DCN parts of its
collectives) through the megascale runtime: `send` instructions with
is_host_transfer=true whose attributes name the collective, e.g.

  %send.3 = (f32[2,8,128]{...}, u32[], token[]) send(%x, %t), channel_id=7,
      is_host_transfer=true, frontend_attributes={..._xla_megascale_transfer_type="ALL_REDUCE"...}

The data operand is this chip's share of the transfer. A send inside a loop
runs once per iteration: `dcn_transfers` counts each one as many times as the
loops around it run, their trip counts read from the loop conditions
(`counter < N`, the counter's start traced to its constant) or from XLA's
known_trip_count annotation.
"""
from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(ENTRY )?%([^\s(]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[^\s=]+) = (.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=(\{[^}]*\}|%[^\s,)]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY = re.compile(r"\b(pred|bf16|[subfc][0-9]+[a-z0-9]*)\[([0-9,]*)\]")
_TRANSFER = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_OPERANDS = re.compile(r"\b([a-z\-]+)\(([^)]*)\)")


def array_bytes(hlo_type):
  """Bytes of the arrays in an HLO type, e.g. '(f32[2,8,128]{...}, u32[], token[])',
  without a send's scalar sequence number (u32[])."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype == "u32" and not dims:
      continue
    bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+([0-9]+)", dtype).group(1))
    total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
  return total


def _computations(hlo_text):
  """({name: {instruction: text}}, entry name) of an HLO module's text."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = {}
      entry = current if header.group(1) else entry
    elif current is not None and (found := _INSTRUCTION.match(line)):
      computations[current][found.group(1)] = found.group(2)
  return computations, entry


def _op(text):
  """(opcode, [operand names]) of an instruction's right-hand side."""
  body = text.split(") ", 1)[1] if text.startswith("(") else text.split(" ", 1)[-1]
  found = _OPERANDS.search(body)
  if not found:
    return None, []
  return found.group(1), re.findall(r"%[^\s,)]+", found.group(2))


def _constant(instructions, name, depth=0):
  """The integer an instruction holds, following copies and bitcasts; None if not one."""
  text = instructions.get(name)
  if text is None or depth > 8:
    return None
  value = re.search(r"\bconstant\((-?\d+)\)", text)
  if value:
    return int(value.group(1))
  op, operands = _op(text)
  if op in ("copy", "bitcast", "convert") and operands:
    return _constant(instructions, operands[0], depth + 1)
  return None


def _trip_count(computations, computation, text):
  """Iterations of the while loop `text` in `computation`, or None if unknown."""
  known = _KNOWN_TRIPS.search(text)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=(%[^\s,]+)", text).group(1)[1:]
  cond = computations.get(condition, {})
  root = next((t for t in cond.values() if " compare(" in t), None)
  direction = re.search(r"direction=([A-Z]+)", root or "")
  if root is None or direction is None or direction.group(1) not in ("LT", "LE"):
    return None
  _, (counter, limit) = _op(root)
  bound = _constant(cond, limit)
  index = re.search(r"index=(\d+)", cond.get(counter, ""))
  if bound is None or index is None:
    return None
  _, (init_tuple, *_) = _op(text)
  elements = _op(computations[computation].get(init_tuple, ""))[1]
  start = (_constant(computations[computation], elements[int(index.group(1))])
           if len(elements) > int(index.group(1)) else None)
  if start is None:
    return None
  return max(0, bound - start + (direction.group(1) == "LE"))


def dcn_transfers(hlo_text):
  """({collective: bytes one chip sends over DCN per step}, loops whose trip
  count could not be read: their sends are counted once)."""
  computations, entry = _computations(hlo_text)
  calls, sends, unknown = {}, [], 0
  for name, instructions in computations.items():
    for text in instructions.values():
      trips = None
      if " while(" in text:
        trips = _trip_count(computations, name, text)
        unknown += trips is None
      for kind, target in _CALLS.findall(text):
        factor = trips if kind in ("body", "condition") and trips is not None else 1
        for callee in re.findall(r"%([^\s,}]+)", target):
          calls.setdefault(name, []).append((callee, factor))
      if " send(" in text and "xla_megascale_runtime" in text:
        transfer = _TRANSFER.search(text)
        sends.append((name, transfer.group(1) if transfer else "SEND",
                      array_bytes(text.split(" send(", 1)[0])))
  runs = {}

  def visit(name, times):
    runs[name] = runs.get(name, 0) + times
    for callee, factor in calls.get(name, ()):
      visit(callee, times * factor)
  if entry is not None:
    visit(entry, 1)
  totals = {}
  for computation, transfer, size in sends:
    totals[transfer] = totals.get(transfer, 0) + size * runs.get(computation, 0)
  return totals, unknown
