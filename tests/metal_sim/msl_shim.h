// msl_shim.h: the subset of the Metal Shading Language (MSL 3.1) that our
// .metal compute kernels use, as C++20, for the Metal-on-CPU simulator.
//
// The build force-includes this header (g++ -include msl_shim.h) in front of
// a .metal file that the pre-pass in metal_sim/build.py has expanded (see
// README.md). Everything that involves other threads (barriers, SIMD
// collectives, simdgroup_matrix multiply, threadgroup memory) calls into the
// runtime (msl_runtime.cpp), which runs every simulated thread as a fiber.
//
// This header holds Metal's *language* (types, conversions, math, collective
// semantics); it holds no kernel logic.
#pragma once
#pragma GCC system_header  // reserved literal suffix `h`, unknown attributes

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "msl_abi.h"

// The call site of a barrier or collective (default arguments are evaluated
// at the caller): the runtime groups diverged lanes by site and names it in
// diagnostics.
#if defined(__has_builtin) && __has_builtin(__builtin_COLUMN)
#define MSL_BUILTIN_COLUMN __builtin_COLUMN()
#else
#define MSL_BUILTIN_COLUMN 0u
#endif
#define MSL_SITE_PARAMS \
  const char *msl_file_ = __builtin_FILE(), unsigned msl_line_ = __builtin_LINE(), unsigned msl_col_ = MSL_BUILTIN_COLUMN
#define MSL_SITE_ARGS msl_file_, msl_line_, msl_col_

// ------------------------------------------------------------- scalar types
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

namespace msl {
namespace detail {
inline uint32_t f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

// float -> IEEE binary16, round to nearest even (subnormals, overflow to inf, NaN kept).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (ax >= 0x38800000u) {                                  // normal half
    ax += 0xc8000fffu + ((ax >> 13) & 1u);                  // rebias exponent, round half to even
    return uint16_t(sign | (ax >> 13));
  }
  // subnormal half (or zero): let the FPU round at 2^-24 by adding 0.5f.
  float r = u2f(ax) + 0.5f;
  return uint16_t(sign | (f2u(r) - 0x3f000000u));
}
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) { float v = float(m) * 0x1p-24f; return sign ? -v : v; }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
// float -> bfloat16, round to nearest even (NaN stays NaN).
inline uint16_t float_to_bfloat_bits(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}
inline float bfloat_bits_to_float(uint16_t b) { return u2f(uint32_t(b) << 16); }

struct half_traits {
  static uint16_t enc(float f) { return float_to_half_bits(f); }
  static float dec(uint16_t b) { return half_bits_to_float(b); }
};
struct bfloat_traits {
  static uint16_t enc(float f) { return float_to_bfloat_bits(f); }
  static float dec(uint16_t b) { return bfloat_bits_to_float(b); }
};
}  // namespace detail

// A 16-bit float: storage only; every operation computes in float and rounds
// the result back (as the GPU's native 16-bit ALU does per operation).
template <class Tr>
struct f16_t {
  uint16_t bits;
  f16_t() = default;
  template <class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0>
  constexpr f16_t(U v) : bits(Tr::enc(float(v))) {}
  template <class Tr2, std::enable_if_t<!std::is_same_v<Tr, Tr2>, int> = 0>
  explicit f16_t(f16_t<Tr2> v) : bits(Tr::enc(float(v))) {}
  operator float() const { return Tr::dec(bits); }
  static f16_t from_bits(uint16_t b) { f16_t r; r.bits = b; return r; }
  f16_t operator-() const { return from_bits(uint16_t(bits ^ 0x8000u)); }
  f16_t operator+() const { return *this; }
  template <class U> f16_t& operator+=(U v) { return *this = f16_t(float(*this) + float(v)); }
  template <class U> f16_t& operator-=(U v) { return *this = f16_t(float(*this) - float(v)); }
  template <class U> f16_t& operator*=(U v) { return *this = f16_t(float(*this) * float(v)); }
  template <class U> f16_t& operator/=(U v) { return *this = f16_t(float(*this) / float(v)); }
  f16_t& operator++() { return *this += 1.0f; }
  f16_t& operator--() { return *this -= 1.0f; }
  f16_t operator++(int) { f16_t r = *this; *this += 1.0f; return r; }
  f16_t operator--(int) { f16_t r = *this; *this -= 1.0f; return r; }
};
using half_t = f16_t<detail::half_traits>;
using bfloat_t = f16_t<detail::bfloat_traits>;

template <class T> struct is_f16 : std::false_type {};
template <class Tr> struct is_f16<f16_t<Tr>> : std::true_type {};
template <class T> inline constexpr bool is_f16_v = is_f16<T>::value;
template <class T> inline constexpr bool is_scalar_v = std::is_arithmetic_v<T> || is_f16_v<T>;

// Usual arithmetic conversions with 16-bit floats, as in MSL:
// half op half -> half; half op int -> half; half op float -> float;
// half op bfloat -> float.
template <class A, class B> struct f16_result;
template <class Tr> struct f16_result<f16_t<Tr>, f16_t<Tr>> { using type = f16_t<Tr>; };
template <class Tr1, class Tr2> struct f16_result<f16_t<Tr1>, f16_t<Tr2>> { using type = float; };
template <class Tr, class U> struct f16_result<f16_t<Tr>, U> {
  using type = std::conditional_t<std::is_floating_point_v<U>, U, f16_t<Tr>>;
};
template <class U, class Tr> struct f16_result<U, f16_t<Tr>> : f16_result<f16_t<Tr>, U> {};
template <class A, class B>
concept f16_operands = (is_f16_v<A> || is_f16_v<B>) && is_scalar_v<A> && is_scalar_v<B>;
template <class T> inline auto to_arith(T v) {
  if constexpr (is_f16_v<T>) return float(v); else return v;
}

#define MSL_F16_BINOP(op)                                                      \
  template <class A, class B> requires f16_operands<A, B>                      \
  inline typename f16_result<A, B>::type operator op(A a, B b) {               \
    using R = typename f16_result<A, B>::type;                                 \
    return R(to_arith(a) op to_arith(b));                                      \
  }
MSL_F16_BINOP(+)
MSL_F16_BINOP(-)
MSL_F16_BINOP(*)
MSL_F16_BINOP(/)
#undef MSL_F16_BINOP
#define MSL_F16_CMP(op)                                                        \
  template <class A, class B> requires f16_operands<A, B>                      \
  inline bool operator op(A a, B b) { return to_arith(a) op to_arith(b); }
MSL_F16_CMP(<)
MSL_F16_CMP(<=)
MSL_F16_CMP(>)
MSL_F16_CMP(>=)
MSL_F16_CMP(==)
MSL_F16_CMP(!=)
#undef MSL_F16_CMP
}  // namespace msl

typedef msl::half_t half;
typedef msl::bfloat_t bfloat;

namespace metal {
using ::half;
using ::bfloat;
using ::uint;
using ::ushort;
using ::uchar;
using ::ulong;

// `1.0h`: MSL's half literal.
inline half operator""h(long double v) { return half(float(v)); }
inline half operator""h(unsigned long long v) { return half(float(v)); }

// ------------------------------------------------------------- vector types
template <class T, int N> struct vec_storage;
template <class T> struct alignas(2 * sizeof(T)) vec_storage<T, 2> { T x, y; };
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 3> { T x, y, z; };
template <class T> struct alignas(4 * sizeof(T)) vec_storage<T, 4> { T x, y, z, w; };

template <class T, int N> struct vec;
template <class T> struct vec_size { static constexpr int value = 1; };
template <class T, int N> struct vec_size<vec<T, N>> { static constexpr int value = N; };
template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<vec<T, N>> : std::true_type {};
template <class T> inline constexpr bool is_vec_v = is_vec<T>::value;

template <class T, int N>
struct vec : vec_storage<T, N> {
  using value_type = T;
  static constexpr int size = N;
  vec() = default;
  // splat: float4(0.0f)
  template <class U, std::enable_if_t<msl::is_scalar_v<U>, int> = 0>
  constexpr vec(U s) { for (int i = 0; i < N; ++i) (*this)[i] = T(s); }
  // components: float4(a, b, c, d), float4(float2, float2), float4(float3, w)
  template <class A0, class A1, class... As,
            std::enable_if_t<vec_size<A0>::value + vec_size<A1>::value + (0 + ... + vec_size<As>::value) == N, int> = 0>
  constexpr vec(A0 a0, A1 a1, As... as) {
    int i = 0;
    put(i, a0);
    put(i, a1);
    (put(i, as), ...);
  }
  // conversion: float4(half4)
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  explicit constexpr vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]); }

  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }

 private:
  template <class A> constexpr void put(int& i, const A& a) {
    if constexpr (is_vec_v<A>) { for (int j = 0; j < A::size; ++j) (*this)[i++] = T(a[j]); }
    else (*this)[i++] = T(a);
  }
};

template <class T, int N> inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = -a[i]; return r;
}
template <class T, int N> inline vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> inline vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = ~a[i]; return r;
}
template <class T, int N> inline vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = !a[i]; return r;
}

#define MSL_VEC_BINOP(op)                                                                          \
  template <class T, int N> inline vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]); return r;                     \
  }                                                                                                \
  template <class T, int N, class U, std::enable_if_t<msl::is_scalar_v<U>, int> = 0>               \
  inline vec<T, N> operator op(const vec<T, N>& a, U b) {                                          \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(a[i] op T(b)); return r;                     \
  }                                                                                                \
  template <class T, int N, class U, std::enable_if_t<msl::is_scalar_v<U>, int> = 0>               \
  inline vec<T, N> operator op(U a, const vec<T, N>& b) {                                          \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(T(a) op b[i]); return r;                     \
  }                                                                                                \
  template <class T, int N, class U>                                                               \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const U& b) { return a = a op b; }
MSL_VEC_BINOP(+)
MSL_VEC_BINOP(-)
MSL_VEC_BINOP(*)
MSL_VEC_BINOP(/)
MSL_VEC_BINOP(%)
MSL_VEC_BINOP(&)
MSL_VEC_BINOP(|)
MSL_VEC_BINOP(^)
MSL_VEC_BINOP(<<)
MSL_VEC_BINOP(>>)
#undef MSL_VEC_BINOP

#define MSL_VEC_CMP(op)                                                                               \
  template <class T, int N> inline vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = a[i] op b[i]; return r;                        \
  }                                                                                                   \
  template <class T, int N, class U, std::enable_if_t<msl::is_scalar_v<U>, int> = 0>                  \
  inline vec<bool, N> operator op(const vec<T, N>& a, U b) {                                          \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = a[i] op T(b); return r;                        \
  }
MSL_VEC_CMP(<)
MSL_VEC_CMP(<=)
MSL_VEC_CMP(>)
MSL_VEC_CMP(>=)
MSL_VEC_CMP(==)
MSL_VEC_CMP(!=)
#undef MSL_VEC_CMP

template <int N> inline bool all(const vec<bool, N>& v) { for (int i = 0; i < N; ++i) if (!v[i]) return false; return true; }
template <int N> inline bool any(const vec<bool, N>& v) { for (int i = 0; i < N; ++i) if (v[i]) return true; return false; }
inline bool all(bool v) { return v; }
inline bool any(bool v) { return v; }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i]; return r;
}

// ------------------------------------------------------------------ as_type
template <class T, class U> inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  __builtin_memcpy(&t, &u, sizeof(T));
  return t;
}

// -------------------------------------------------------------- type traits
using std::conditional;
using std::conditional_t;
using std::enable_if;
using std::enable_if_t;
using std::is_same;
using std::is_same_v;
using std::is_integral;
using std::is_integral_v;
using std::is_signed;
using std::is_signed_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::remove_cv_t;
using std::remove_reference_t;
using std::integral_constant;
using std::true_type;
using std::false_type;
using std::declval;
template <class T> struct is_floating_point
    : std::integral_constant<bool, std::is_floating_point_v<T> || msl::is_f16_v<T>> {};
template <class T> inline constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : std::integral_constant<bool, msl::is_scalar_v<T>> {};
template <class T> inline constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_scalar : std::integral_constant<bool, msl::is_scalar_v<T>> {};
template <class T> inline constexpr bool is_scalar_v = is_scalar<T>::value;

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <class Tr> struct numeric_limits<msl::f16_t<Tr>> {
  using T = msl::f16_t<Tr>;
  static constexpr bool is_specialized = true;
  static constexpr bool is_bf = std::is_same_v<Tr, msl::detail::bfloat_traits>;
  static T infinity() { return T::from_bits(is_bf ? 0x7f80 : 0x7c00); }
  static T quiet_NaN() { return T::from_bits(is_bf ? 0x7fc0 : 0x7e00); }
  static T max() { return T::from_bits(is_bf ? 0x7f7f : 0x7bff); }
  static T lowest() { return T::from_bits(is_bf ? 0xff7f : 0xfbff); }
  static T min() { return T::from_bits(is_bf ? 0x0080 : 0x0400); }
  static T epsilon() { return T::from_bits(is_bf ? 0x3c00 : 0x1400); }
};

// ------------------------------------------------------------------- math
// MSL's float constants (metal_math).
#ifndef NAN
#define NAN __builtin_nanf("")
#endif
#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif
namespace detail {
template <class T> inline auto math_arg(T v) {
  if constexpr (msl::is_f16_v<T>) return float(v); else return v;
}
}  // namespace detail

// Unary float functions: float/half/bfloat scalars (16-bit floats computed in
// float and rounded once) and vectors element-wise.
#define MSL_UNARY(name, fexpr)                                                          \
  template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>                  \
  inline T name(T v) {                                                                  \
    if constexpr (std::is_same_v<T, double>) { double x = v; (void)x; return T(fexpr); } \
    else { float x = float(v); (void)x; return T(fexpr); }                               \
  }                                                                                     \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& v) {                 \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(v[i]); return r;               \
  }
MSL_UNARY(exp, __builtin_expf(x))
MSL_UNARY(exp2, __builtin_exp2f(x))
MSL_UNARY(exp10, __builtin_powf(10.0f, x))
MSL_UNARY(log, __builtin_logf(x))
MSL_UNARY(log2, __builtin_log2f(x))
MSL_UNARY(log10, __builtin_log10f(x))
MSL_UNARY(sqrt, __builtin_sqrtf(x))
MSL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_UNARY(sin, __builtin_sinf(x))
MSL_UNARY(cos, __builtin_cosf(x))
MSL_UNARY(tan, __builtin_tanf(x))
MSL_UNARY(asin, __builtin_asinf(x))
MSL_UNARY(acos, __builtin_acosf(x))
MSL_UNARY(atan, __builtin_atanf(x))
MSL_UNARY(sinh, __builtin_sinhf(x))
MSL_UNARY(cosh, __builtin_coshf(x))
MSL_UNARY(tanh, __builtin_tanhf(x))
MSL_UNARY(floor, __builtin_floorf(x))
MSL_UNARY(ceil, __builtin_ceilf(x))
MSL_UNARY(round, __builtin_roundf(x))
MSL_UNARY(rint, __builtin_rintf(x))
MSL_UNARY(trunc, __builtin_truncf(x))
MSL_UNARY(fabs, __builtin_fabsf(x))
MSL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSL_UNARY(erf, __builtin_erff(x))
MSL_UNARY(log1p, __builtin_log1pf(x))
MSL_UNARY(expm1, __builtin_expm1f(x))
#undef MSL_UNARY

#define MSL_BINARY(name, fexpr)                                                           \
  template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>                    \
  inline T name(T a, T b) { float x = float(a), y = float(b); return T(fexpr); }          \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) { \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]); return r;           \
  }
MSL_BINARY(pow, __builtin_powf(x, y))
MSL_BINARY(powr, __builtin_powf(x, y))
MSL_BINARY(fmin, __builtin_fminf(x, y))
MSL_BINARY(fmax, __builtin_fmaxf(x, y))
MSL_BINARY(fmod, __builtin_fmodf(x, y))
MSL_BINARY(atan2, __builtin_atan2f(x, y))
MSL_BINARY(copysign, __builtin_copysignf(x, y))
MSL_BINARY(step, y < x ? 0.0f : 1.0f)
#undef MSL_BINARY

// fma: one rounding (float) / float fma then one rounding to 16 bits.
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline T fma(T a, T b, T c) { return T(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, int N> inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = fma(a[i], b[i], c[i]); return r;
}

// min/max/abs/clamp: MSL's min/max of floats return the non-NaN operand (fmin/fmax).
template <class T, std::enable_if_t<is_scalar_v<T>, int> = 0>
inline T max(T a, T b) {
  if constexpr (is_floating_point_v<T>) return T(__builtin_fmaxf(float(a), float(b)));
  else return a < b ? b : a;
}
template <class T, std::enable_if_t<is_scalar_v<T>, int> = 0>
inline T min(T a, T b) {
  if constexpr (is_floating_point_v<T>) return T(__builtin_fminf(float(a), float(b)));
  else return b < a ? b : a;
}
template <class T, std::enable_if_t<is_scalar_v<T>, int> = 0>
inline T abs(T a) {
  if constexpr (is_floating_point_v<T>) return T(__builtin_fabsf(float(a)));
  else if constexpr (std::is_signed_v<T>) return a < 0 ? T(-a) : a;
  else return a;
}
template <class T, std::enable_if_t<is_scalar_v<T>, int> = 0>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, int N> inline vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = max(a[i], b[i]); return r;
}
template <class T, int N> inline vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = min(a[i], b[i]); return r;
}
template <class T, int N> inline vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = abs(a[i]); return r;
}
template <class T, int N> inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  return min(max(x, lo), hi);
}
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline T mix(T x, T y, T a) { return T(float(x) + (float(y) - float(x)) * float(a)); }
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline T saturate(T x) { return clamp(x, T(0), T(1)); }
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline T sign(T x) { float v = float(x); return T(v > 0 ? 1.0f : v < 0 ? -1.0f : v); }
template <class T, int N> inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = T(a[0] * b[0]);
  for (int i = 1; i < N; ++i) r = T(r + a[i] * b[i]);
  return r;
}
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline bool isnan(T x) { float v = float(x); return v != v; }
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T popcount(T x) { return T(__builtin_popcountll(uint64_t(std::make_unsigned_t<T>(x)))); }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T clz(T x) {
  constexpr int bits = int(sizeof(T) * 8);
  uint64_t u = uint64_t(std::make_unsigned_t<T>(x));
  return T(u == 0 ? bits : __builtin_clzll(u) - (64 - bits));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T ctz(T x) {
  uint64_t u = uint64_t(std::make_unsigned_t<T>(x));
  return T(u == 0 ? int(sizeof(T) * 8) : __builtin_ctzll(u));
}

template <class T, std::enable_if_t<is_floating_point_v<T>, int> = 0>
inline T divide(T a, T b) { return T(float(a) / float(b)); }

// metal::precise:: and metal::fast:: variants: the same IEEE float functions
// here (fast-math error bounds of the GPU are not modelled).
#define MSL_MATH_USING                                                                      \
  using metal::exp; using metal::exp2; using metal::exp10; using metal::log;               \
  using metal::log2; using metal::log10; using metal::sqrt; using metal::rsqrt;            \
  using metal::sin; using metal::cos; using metal::tan; using metal::tanh;                 \
  using metal::pow; using metal::powr; using metal::fma; using metal::max; using metal::min; \
  using metal::fmax; using metal::fmin; using metal::abs; using metal::fabs;               \
  using metal::floor; using metal::ceil; using metal::divide; using metal::clamp;          \
  using metal::erf; using metal::log1p; using metal::expm1; using metal::round;            \
  using metal::trunc; using metal::rint; using metal::fract; using metal::sign;
namespace precise { MSL_MATH_USING }
namespace fast { MSL_MATH_USING }
#undef MSL_MATH_USING

// ----------------------------------------------------- barriers, mem_flags
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
inline constexpr mem_flags operator&(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) & unsigned(b)); }

// All threads of the threadgroup rendezvous here; `flags` says which memory
// becomes visible (the race detector orders only those accesses).
inline void threadgroup_barrier(mem_flags flags, MSL_SITE_PARAMS) {
  msl_rt_barrier(0, unsigned(flags), MSL_SITE_ARGS);
}
inline void simdgroup_barrier(mem_flags flags, MSL_SITE_PARAMS) {
  msl_rt_barrier(1, unsigned(flags), MSL_SITE_ARGS);
}

// ------------------------------------------------------- SIMD collectives
// Every collective is one all-gather rendezvous of the simdgroup's active
// lanes (runtime), then the operation's definition applied to the gathered
// values. Inactive lanes (exited, diverged, or beyond a partial simdgroup)
// take no part; reading one gives poison (all bits set: NaN for floats).
constexpr unsigned simd_width = 32;
namespace detail {
template <class T> struct simd_values {
  T v[simd_width];
  uint32_t mask;
  unsigned lane;
  bool active(unsigned l) const { return l < simd_width && ((mask >> l) & 1u); }
};
template <class T>
inline void gather(const T& x, simd_values<T>& out, const char* f, unsigned l, unsigned c) {
  msl_rt_simd_exchange(&x, sizeof(T), out.v, &out.mask, f, l, c);
  out.lane = msl_rt_thread_info()->thread_index_in_simdgroup;
}
template <class T> inline T poison() { T t; __builtin_memset(&t, 0xff, sizeof(T)); return t; }
template <class T, class Op> inline T reduce(const simd_values<T>& s, Op op, unsigned upto = simd_width) {
  bool have = false;
  T acc{};
  for (unsigned l = 0; l < upto; ++l) {
    if (!s.active(l)) continue;
    acc = have ? T(op(acc, s.v[l])) : s.v[l];
    have = true;
  }
  return acc;
}
}  // namespace detail

#define MSL_SIMD_REDUCE(name, expr)                                          \
  template <class T> inline T name(T x, MSL_SITE_PARAMS) {                   \
    detail::simd_values<T> s;                                                \
    detail::gather(x, s, MSL_SITE_ARGS);                                     \
    return detail::reduce(s, [](const T& a, const T& b) { return expr; });  \
  }
MSL_SIMD_REDUCE(simd_sum, a + b)
MSL_SIMD_REDUCE(simd_product, a * b)
MSL_SIMD_REDUCE(simd_max, metal::max(a, b))
MSL_SIMD_REDUCE(simd_min, metal::min(a, b))
MSL_SIMD_REDUCE(simd_and, a & b)
MSL_SIMD_REDUCE(simd_or, a | b)
MSL_SIMD_REDUCE(simd_xor, a ^ b)
#undef MSL_SIMD_REDUCE

template <class T> inline T simd_prefix_inclusive_sum(T x, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::reduce(s, [](const T& a, const T& b) { return a + b; }, s.lane + 1);
}
template <class T> inline T simd_prefix_exclusive_sum(T x, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  bool any_before = false;
  for (unsigned l = 0; l < s.lane; ++l) any_before |= s.active(l);
  if (!any_before) return T(0);
  return detail::reduce(s, [](const T& a, const T& b) { return a + b; }, s.lane);
}
// Read lane `src` of the gathered values: poison if that lane is inactive.
namespace detail {
template <class T> inline T lane_value(const simd_values<T>& s, unsigned src) {
  return s.active(src) ? s.v[src] : poison<T>();
}
}  // namespace detail
template <class T> inline T simd_shuffle(T x, ushort lane, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::lane_value(s, lane);
}
template <class T> inline T simd_broadcast(T x, ushort lane, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::lane_value(s, lane);
}
template <class T> inline T simd_broadcast_first(T x, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::lane_value(s, unsigned(__builtin_ctz(s.mask)));
}
// shuffle_down: the upper `delta` lanes (lane + delta >= 32) keep their value.
template <class T> inline T simd_shuffle_down(T x, ushort delta, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  unsigned src = s.lane + delta;
  return src >= simd_width ? x : detail::lane_value(s, src);
}
// shuffle_up: the lower `delta` lanes keep their value.
template <class T> inline T simd_shuffle_up(T x, ushort delta, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return delta > s.lane ? x : detail::lane_value(s, s.lane - delta);
}
template <class T> inline T simd_shuffle_xor(T x, ushort mask, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::lane_value(s, (s.lane ^ mask) & (simd_width - 1));
}
template <class T> inline T simd_shuffle_rotate_down(T x, ushort delta, MSL_SITE_PARAMS) {
  detail::simd_values<T> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::lane_value(s, (s.lane + delta) % simd_width);
}
inline bool simd_all(bool x, MSL_SITE_PARAMS) {
  detail::simd_values<bool> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::reduce(s, [](bool a, bool b) { return a && b; });
}
inline bool simd_any(bool x, MSL_SITE_PARAMS) {
  detail::simd_values<bool> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  return detail::reduce(s, [](bool a, bool b) { return a || b; });
}
struct simd_vote {
  using vote_t = uint64_t;
  vote_t bits;
  explicit simd_vote(vote_t b = 0) : bits(b) {}
  explicit operator vote_t() const { return bits; }
  bool all() const { return bits == 0xffffffffu; }
  bool any() const { return bits != 0; }
};
inline simd_vote simd_ballot(bool x, MSL_SITE_PARAMS) {
  detail::simd_values<bool> s;
  detail::gather(x, s, MSL_SITE_ARGS);
  uint64_t b = 0;
  for (unsigned l = 0; l < simd_width; ++l) if (s.active(l) && s.v[l]) b |= uint64_t(1) << l;
  return simd_vote(b);
}
inline bool simd_is_first(MSL_SITE_PARAMS) {
  detail::simd_values<char> s;
  detail::gather(char(0), s, MSL_SITE_ARGS);
  return s.lane == unsigned(__builtin_ctz(s.mask));
}

// ------------------------------------------------------ simdgroup_matrix
// An 8x8 matrix distributed over the 32 lanes of a simdgroup: each lane owns
// two horizontally adjacent elements (thread_elements()), in the layout
// Apple's GPUs use (the one MLX's steel GEMM relies on):
//   row = (q & 4) + (lane / 2) % 4,  col = (q & 2) * 2 + (lane % 2) * 2,  q = lane / 4
// Load and store are per-lane memory accesses of a lane's own two elements;
// multiply(-accumulate) is a collective rendezvous of all 32 lanes (an error
// is reported if any lane is inactive).
namespace detail {
struct mat_coord { unsigned row, col; };
inline mat_coord simdgroup_matrix_coord(unsigned lane) {
  unsigned q = lane / 4;
  return {(q & 4u) + (lane / 2) % 4, (q & 2u) * 2 + (lane % 2) * 2};
}
inline unsigned current_lane() { return msl_rt_thread_info()->thread_index_in_simdgroup; }
}  // namespace detail

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the simulator supports 8x8 simdgroup matrices");
  vec<T, 2> elements_;
  simdgroup_matrix() = default;
  // MSL: a diagonal matrix with `diag` on the diagonal.
  explicit simdgroup_matrix(T diag) {
    auto c = detail::simdgroup_matrix_coord(detail::current_lane());
    for (unsigned j = 0; j < 2; ++j) elements_[j] = (c.row == c.col + j) ? diag : T(0);
  }
  vec<T, 2>& thread_elements() { return elements_; }
  const vec<T, 2>& thread_elements() const { return elements_; }
};
template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.elements_ = vec<T, 2>(value);
  return m;
}

// matrix_origin: (x = column, y = row) of the matrix's first element in the
// source; transpose_matrix loads element (r, c) from source (c, r).
template <class T, class U, int C, int R>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& d, const U* src, ulong elements_per_row = C,
                           vec<ulong, 2> matrix_origin = vec<ulong, 2>(0), bool transpose_matrix = false) {
  auto c = detail::simdgroup_matrix_coord(detail::current_lane());
  for (unsigned j = 0; j < 2; ++j) {
    ulong r = c.row, col = c.col + j;
    if (transpose_matrix) { ulong t = r; r = col; col = t; }
    d.elements_[j] = T(src[(matrix_origin.y + r) * elements_per_row + matrix_origin.x + col]);
  }
}
template <class T, class U, int C, int R>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& m, U* dst, ulong elements_per_row = C,
                            vec<ulong, 2> matrix_origin = vec<ulong, 2>(0), bool transpose_matrix = false) {
  auto c = detail::simdgroup_matrix_coord(detail::current_lane());
  for (unsigned j = 0; j < 2; ++j) {
    ulong r = c.row, col = c.col + j;
    if (transpose_matrix) { ulong t = r; r = col; col = t; }
    dst[(matrix_origin.y + r) * elements_per_row + matrix_origin.x + col] = U(m.elements_[j]);
  }
}

namespace detail {
template <class TA, class TB, class TC> struct mma_frag { vec<TA, 2> a; vec<TB, 2> b; vec<TC, 2> c; };
// d = a * b + c: float products and sums, in k order, one rounding to TD.
template <class TD, class TA, class TB, class TC>
inline void mma(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                const char* f, unsigned l, unsigned col) {
  mma_frag<TA, TB, TC> mine{a.elements_, b.elements_, c.elements_};
  simd_values<mma_frag<TA, TB, TC>> s;
  gather(mine, s, f, l, col);
  if (s.mask != 0xffffffffu) {
    msl_rt_error("simdgroup_matrix", "simdgroup_multiply_accumulate with inactive lanes (needs all 32)");
    return;
  }
  float A[8][8], B[8][8], C[8][8];
  for (unsigned ln = 0; ln < simd_width; ++ln) {
    auto p = simdgroup_matrix_coord(ln);
    for (unsigned j = 0; j < 2; ++j) {
      A[p.row][p.col + j] = float(s.v[ln].a[j]);
      B[p.row][p.col + j] = float(s.v[ln].b[j]);
      C[p.row][p.col + j] = float(s.v[ln].c[j]);
    }
  }
  auto me = simdgroup_matrix_coord(s.lane);
  for (unsigned j = 0; j < 2; ++j) {
    float acc = C[me.row][me.col + j];
    for (unsigned k = 0; k < 8; ++k) acc = __builtin_fmaf(A[me.row][k], B[k][me.col + j], acc);
    d.elements_[j] = TD(acc);
  }
}
}  // namespace detail

template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b,
                                          const simdgroup_matrix<TC, 8, 8>& c, MSL_SITE_PARAMS) {
  detail::mma(d, a, b, c, MSL_SITE_ARGS);
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b, MSL_SITE_PARAMS) {
  simdgroup_matrix<TD, 8, 8> zero = make_filled_simdgroup_matrix<TD, 8, 8>(TD(0));
  detail::mma(d, a, b, zero, MSL_SITE_ARGS);
}

// ---------------------------------------------------------------- atomics
// Cooperative fibers on one OS thread make each operation indivisible; the
// race detector does not check atomic accesses.
enum memory_order { memory_order_relaxed = 0 };
template <class T> struct atomic { T value; };
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_float = atomic<float>;
using atomic_bool = atomic<bool>;
namespace detail {
struct untracked_scope {
  untracked_scope() { msl_rt_untracked(1); }
  ~untracked_scope() { msl_rt_untracked(0); }
};
}  // namespace detail
template <class T, class U> inline void atomic_store_explicit(atomic<T>* o, U v, memory_order) {
  detail::untracked_scope u; o->value = T(v);
}
template <class T> inline T atomic_load_explicit(const atomic<T>* o, memory_order) {
  detail::untracked_scope u; return o->value;
}
#define MSL_ATOMIC_RMW(name, expr)                                             \
  template <class T, class U> inline T name(atomic<T>* o, U v, memory_order) { \
    detail::untracked_scope u;                                                 \
    T old = o->value; T arg = T(v); (void)arg; o->value = (expr); return old;  \
  }
MSL_ATOMIC_RMW(atomic_exchange_explicit, arg)
MSL_ATOMIC_RMW(atomic_fetch_add_explicit, T(old + arg))
MSL_ATOMIC_RMW(atomic_fetch_sub_explicit, T(old - arg))
MSL_ATOMIC_RMW(atomic_fetch_max_explicit, metal::max(old, arg))
MSL_ATOMIC_RMW(atomic_fetch_min_explicit, metal::min(old, arg))
MSL_ATOMIC_RMW(atomic_fetch_and_explicit, T(old & arg))
MSL_ATOMIC_RMW(atomic_fetch_or_explicit, T(old | arg))
MSL_ATOMIC_RMW(atomic_fetch_xor_explicit, T(old ^ arg))
#undef MSL_ATOMIC_RMW
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, U desired, memory_order, memory_order) {
  detail::untracked_scope u;
  if (o->value == *expected) { o->value = T(desired); return true; }
  *expected = o->value;
  return false;
}
}  // namespace metal

// ------------------------------------------------------ vector type names
#define MSL_VEC_TYPES(T, name)                 \
  typedef metal::vec<T, 2> name##2;           \
  typedef metal::vec<T, 3> name##3;           \
  typedef metal::vec<T, 4> name##4;           \
  namespace metal {                           \
  using ::name##2; using ::name##3; using ::name##4; \
  }
MSL_VEC_TYPES(float, float)
MSL_VEC_TYPES(half, half)
MSL_VEC_TYPES(bfloat, bfloat)
MSL_VEC_TYPES(int, int)
MSL_VEC_TYPES(uint, uint)
MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort)
MSL_VEC_TYPES(char, char)
MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(long, long)
MSL_VEC_TYPES(ulong, ulong)
MSL_VEC_TYPES(bool, bool)
#undef MSL_VEC_TYPES
typedef metal::simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef metal::simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef metal::simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
namespace metal {
using ::simdgroup_float8x8;
using ::simdgroup_half8x8;
using ::simdgroup_bfloat8x8;
}  // namespace metal

// ---------------------------------------------- simulator glue (pre-pass)
namespace msl::detail {
// `threadgroup T name[N];` in a kernel becomes
// `auto& name = ::msl::detail::tg_var<T[N]>("name", []{});`: one allocation
// per threadgroup, shared by its threads (the lambda's type makes the key).
template <class T, class Key> inline T& tg_var(const char* name, Key) {
  static char key;
  constexpr size_t align = alignof(T) > 16 ? alignof(T) : 16;
  return *static_cast<T*>(msl_rt_tg_alloc(&key, name, sizeof(T), align));
}

// Kernel parameter binding. Codes (from the [[...]] attribute of each parameter):
enum binding_kind : int {
  bind_buffer, bind_threadgroup, bind_tpig, bind_tgpig, bind_tpitg, bind_tptg, bind_tgpg, bind_tpg,
  bind_tiitg, bind_tiisg, bind_sgitg, bind_sgptg, bind_tpsg,
};
struct binding { int kind, index; };

template <class T> struct is_position_type : std::integral_constant<bool, std::is_integral_v<T>> {};
template <class T, int N> struct is_position_type<metal::vec<T, N>> : std::integral_constant<bool, std::is_integral_v<T>> {};

template <class R> inline R position_value(const uint32_t* v) {
  if constexpr (metal::is_vec_v<R>) {
    R r;
    for (int i = 0; i < R::size; ++i) r[i] = typename R::value_type(v[i]);
    return r;
  } else {
    return R(v[0]);
  }
}

inline void* buffer_pointer(const binding& b, const msl_thread_info* ti, size_t need) {
  bool tg = b.kind == bind_threadgroup;
  int n = tg ? ti->ntg : ti->nbuffers;
  if (b.index < 0 || b.index >= n) {
    msl_rt_fatal("binding", tg ? "kernel reads a [[threadgroup(n)]] that the launch did not set"
                               : "kernel reads a [[buffer(n)]] that the launch did not set");
    return nullptr;  // not reached
  }
  uint64_t have = tg ? ti->tg_sizes[b.index] : ti->buffer_sizes[b.index];
  if (need > have) msl_rt_error("binding", "a [[buffer(n)]] passed by value/reference is smaller than its type");
  return tg ? ti->tg_buffers[b.index] : ti->buffers[b.index];
}

template <class A> inline A get_arg(const binding& b, const msl_thread_info* ti) {
  using R = std::remove_cv_t<std::remove_reference_t<A>>;
  if constexpr (std::is_pointer_v<A>) {
    return static_cast<A>(buffer_pointer(b, ti, 0));
  } else if constexpr (std::is_reference_v<A>) {
    return *static_cast<std::remove_reference_t<A>*>(buffer_pointer(b, ti, sizeof(R)));
  } else {
    if (b.kind == bind_buffer || b.kind == bind_threadgroup) {
      R r;
      void* p = buffer_pointer(b, ti, sizeof(R));
      if (p) __builtin_memcpy(&r, p, sizeof(R)); else __builtin_memset(&r, 0, sizeof(R));
      return r;
    }
    if constexpr (is_position_type<R>::value) {
      uint32_t s[3] = {0, 0, 0};
      const uint32_t* v = s;
      switch (b.kind) {
        case bind_tpig: v = ti->thread_position_in_grid; break;
        case bind_tgpig: v = ti->threadgroup_position_in_grid; break;
        case bind_tpitg: v = ti->thread_position_in_threadgroup; break;
        case bind_tptg: v = ti->threads_per_threadgroup; break;
        case bind_tgpg: v = ti->threadgroups_per_grid; break;
        case bind_tpg: v = ti->threads_per_grid; break;
        case bind_tiitg: s[0] = ti->thread_index_in_threadgroup; break;
        case bind_tiisg: s[0] = ti->thread_index_in_simdgroup; break;
        case bind_sgitg: s[0] = ti->simdgroup_index_in_threadgroup; break;
        case bind_sgptg: s[0] = ti->simdgroups_per_threadgroup; break;
        case bind_tpsg: s[0] = ti->threads_per_simdgroup; break;
        default: msl_rt_error("binding", "unknown binding kind"); break;
      }
      return position_value<R>(v);
    } else {
      msl_rt_error("binding", "a thread-position attribute on a parameter of non-integer type");
      return R{};
    }
  }
}

template <auto F> struct kernel_entry {
  static inline binding bindings[64];
  static inline int nbindings = 0;
  template <class... A, size_t... I>
  static void call(void (*f)(A...), std::index_sequence<I...>) {
    const msl_thread_info* ti = msl_rt_thread_info();
    f(get_arg<A>(bindings[I], ti)...);
  }
  template <class... A> static void call(void (*f)(A...)) {
    if (int(sizeof...(A)) != nbindings) {
      msl_rt_fatal("binding", "parameter count differs from the parsed attributes");
      return;
    }
    call(f, std::index_sequence_for<A...>{});
  }
  static void thunk() { call(F); }
};

// Registers a kernel under its host name; `spec` is the pre-pass's encoding
// of the parameters' attributes: "kind:index,kind:index,...".
struct registrar {
  template <class Entry> static void parse(const char* spec) {
    int n = 0;
    const char* p = spec;
    while (*p) {
      int kind = 0, index = 0;
      while (*p >= '0' && *p <= '9') kind = kind * 10 + (*p++ - '0');
      if (*p == ':') ++p;
      while (*p >= '0' && *p <= '9') index = index * 10 + (*p++ - '0');
      if (*p == ',') ++p;
      Entry::bindings[n++] = binding{kind, index};
    }
    Entry::nbindings = n;
  }
  template <auto F> registrar(const char* name, std::integral_constant<decltype(F), F>, const char* spec) {
    parse<kernel_entry<F>>(spec);
    msl_rt_register_kernel(name, &kernel_entry<F>::thunk);
  }
};
}  // namespace msl::detail
#define MSL_REGISTER_KERNEL(id, name, fn, spec) \
  static ::msl::detail::registrar id(name, std::integral_constant<decltype(&fn), &fn>{}, spec);

// --------------------------------------------------- MSL keywords as C++
#define __METAL_SIM__ 1
#define device
#define threadgroup
#define thread
#define constant const
#define kernel
#define METAL_FUNC inline
