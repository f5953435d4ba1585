"""DCN bytes from a compiled TPU program's text (paxgpt/training/hlo_traffic.py):
megascale sends, counted as often as the loops around them run."""
from paxgpt.training import hlo_traffic

ATTRS = ('is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
         '"xla_megascale_runtime",_xla_megascale_transfer_type="KIND"}')

HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%cond (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %counter = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  %limit = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%counter, %limit), direction=LT
}

%cond.unknown (p.2: (s32[], f32[8])) -> pred[] {
  %p.2 = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %counter.2 = s32[]{:T(128)} get-tuple-element(%p.2), index=0
  %other = s32[]{:T(128)} get-tuple-element(%p.2), index=1
  ROOT %lt.2 = pred[]{:T(512)} compare(%counter.2, %other), direction=LT
}

%body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %token = token[] after-all()
  %data = f32[4,8,128]{2,1,0:T(8,128)} constant({...})
  %send.1 = (f32[4,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%data, %token), channel_id=7, ALL_REDUCE
  ROOT %next = (s32[]{:T(128)}, f32[8]{0}) tuple(%q)
}

%fused_computation.3 (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %negate = f32[8]{0} negate(%param_0)
}

ENTRY %main.9 (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %one = s32[]{:T(128)} constant(1)
  %start = s32[]{:T(128)} copy(%one)
  %init = (s32[]{:T(128)}, f32[8]{0}) tuple(%start, %a)
  %while.1 = (s32[]{:T(128)}, f32[8]{0}) while(%init), condition=%cond, body=%body
  %while.2 = (s32[]{:T(128)}, f32[8]{0}) while(%init), condition=%cond.unknown, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %while.3 = (s32[]{:T(128)}, f32[8]{0}) while(%init), condition=%cond.unknown, body=%body
  %token.9 = token[] after-all()
  %small = bf16[16]{0} constant({...})
  %send.2 = (bf16[16]{0}, u32[], token[]) send(%small, %token.9), channel_id=3, ONE_TO_ONE
  %local = (f32[8]{0}, u32[], token[]) send(%a, %token.9), channel_id=4, is_host_transfer=true
  ROOT %fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation.3
}
"""
HLO = HLO.replace(", ALL_REDUCE", ", " + ATTRS.replace("KIND", "ALL_REDUCE")).replace(
    ", ONE_TO_ONE", ", " + ATTRS.replace("KIND", "ONE_TO_ONE"))


def test_sends_count_once_per_loop_iteration():
  totals, unknown = hlo_traffic.dcn_transfers(HLO)
  # %body runs 5 - 1 times (counter from 1 while < 5), 3 times (XLA's known count),
  # and once for the loop whose bound is not a constant.
  assert totals == {"ALL_REDUCE": (4 + 3 + 1) * 4 * 8 * 128 * 4, "ONE_TO_ONE": 16 * 2}
  assert unknown == 1


def test_array_bytes_reads_hlo_types():
  assert hlo_traffic.array_bytes("(f32[2,8,128]{2,1,0:T(8,128)}, u32[], token[])") == 8192
  assert hlo_traffic.array_bytes("bf16[3,5]{1,0:T(8,128)(2,1)}") == 30
  assert hlo_traffic.array_bytes("(pred[7], s8[2], f8e4m3fn[4])") == 13
