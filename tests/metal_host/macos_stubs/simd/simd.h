#pragma once
namespace simd { struct float4x4 { float columns[4][4]; }; }
