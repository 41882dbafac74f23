// half and bfloat conversions and arithmetic, element-wise.
#include <metal_stdlib>
using namespace metal;

[[kernel]] void convert_from_float(
    device const float* x [[buffer(0)]],
    device half* h [[buffer(1)]],
    device bfloat* b [[buffer(2)]],
    device ushort* h_bits [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  h[i] = half(x[i]);
  b[i] = static_cast<bfloat>(x[i]);
  h_bits[i] = as_type<ushort>(h[i]);
}

[[kernel]] void convert_to_float(
    device const half* h [[buffer(0)]],
    device const bfloat* b [[buffer(1)]],
    device float* hf [[buffer(2)]],
    device float* bf [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  hf[i] = float(h[i]);
  bf[i] = b[i];
}

// half arithmetic rounds every operation to half; vector forms element-wise.
[[kernel]] void half_arith(
    device const half4* a [[buffer(0)]],
    device const half4* b [[buffer(1)]],
    device half4* prod [[buffer(2)]],
    device float4* fsum [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  half4 p = a[i] * b[i];
  prod[i] = p + 1.0h;
  fsum[i] = float4(a[i]) + float4(b[i]);
}
