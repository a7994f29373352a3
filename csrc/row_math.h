// Small numeric helpers shared by the row kernels (header-only, always inlined so
// that they vectorise inside whichever ISA-specific clone calls them).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define STAR_INLINE inline __attribute__((always_inline))

namespace star {

// Rows are scanned in blocks of kBlock elements: one vector of fp32 under AVX-512.
constexpr int64_t kBlock = 16;
// Blocks summed in the row's dtype before the partial sums are flushed to double.
constexpr int64_t kFlushBlocks = 64;

STAR_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

STAR_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for x <= 0 in fp32, written so that the compiler vectorises it: Cody-Waite
// range reduction x = n*ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r (the
// classic Cephes expf coefficients) and 2^n built in the exponent bits. Relative
// error about 1 ulp; results below FLT_MIN flush to 0; NaN propagates; -inf -> 0.
STAR_INLINE float exp_nonpos(float x) {
  constexpr float kLo = -87.33654475f;  // log(FLT_MIN)
  float xc = x > 0.0f ? 0.0f : x;
  xc = xc < kLo ? kLo : xc;
  // Round x*log2(e) to the nearest integer with the 1.5*2^23 trick (no SSE4.1 needed).
  constexpr float kShift = 12582912.0f;  // 0x4B400000
  float t = xc * 1.44269504088896341f + kShift;
  float n = t - kShift;
  int32_t ni = float_to_bits(t) - 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  float y = p * bits_to_float((ni + 127) << 23);
  return x < kLo ? 0.0f : y;
}

STAR_INLINE double exp_nonpos(double x) { return std::exp(x); }

// x * log(y) with 0 * log(anything) = 0, as torch.xlogy.
STAR_INLINE double xlogy(double x, double y) {
  if (std::isnan(y)) return y;
  if (x == 0.0) return 0.0;
  return x * std::log(y);
}

// Max of one block: a lane-wise max tree over the kBlock elements (no scalar tail).
template <typename T>
STAR_INLINE T block_max(const T* z) {
  T m[kBlock / 2];
#pragma omp simd
  for (int64_t j = 0; j < kBlock / 2; ++j) m[j] = z[j] > z[j + kBlock / 2] ? z[j] : z[j + kBlock / 2];
  for (int64_t w = kBlock / 4; w >= 1; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) m[j] = m[j] > m[j + w] ? m[j] : m[j + w];
  }
  return m[0];
}

}  // namespace star
