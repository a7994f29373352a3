// Row kernels of the C++ CPU backend: plain C++ on raw pointers (no torch headers,
// so this part compiles quickly); csrc/bindings.cpp wraps them for Python.
#pragma once

#include <cstdint>

namespace star {

template <typename T>
struct CkdArgs {
  T* logits;                 // [C, V], contiguous; overwritten
  int64_t rows, vocab;
  const int64_t* ids;        // [C, K]
  const T* tlp;              // [C, K]
  int64_t k;
  const int64_t* labels;     // [C] or nullptr (only read when mix < 1)
  const T* grad_scale;       // [C] or nullptr (no gradient)
  T* loss;                   // [C]
  double lam, mix, temperature;
  bool tail_bucket;
  int64_t ignore_index;
  int64_t topm;
  int64_t select_algo;       // 0: size-m min-heap scan, 1: nth_element on a copy
  int64_t kd_type;           // 0: fkl, 1: rkl, 2: akl
};

template <typename T>
struct TopkArgs {
  const T* logits;
  int64_t rows, vocab, k;
  double temperature;
  int64_t* out_ids;
  float* out_lp;
};

template <typename T>
struct LogprobArgs {
  T* logits;                 // [C, V]; overwritten with the gradient when grad_logp
  int64_t rows, vocab;
  const int64_t* tokens;     // [C]
  double temperature;
  bool need_entropy;
  T* out_logp;               // [C]
  T* out_entropy;            // [C] or nullptr
  const T* grad_logp;        // [C] or nullptr
  const T* grad_entropy;     // [C] or nullptr
};

// Process rows [begin, end) of one op; each picks the best ISA clone at run time.
template <typename T>
void ckd_range(const CkdArgs<T>& a, int64_t begin, int64_t end);
template <typename T>
void topk_range(const TopkArgs<T>& a, int64_t begin, int64_t end);
template <typename T>
void logprob_range(const LogprobArgs<T>& a, int64_t begin, int64_t end);

// "avx512", "avx2" or "base": the clone the kernels dispatch to.
const char* isa_name();

}  // namespace star
