// Row kernels of the C++ CPU backend (declared in kernels.h).
//
// Each op reduces a contiguous [C, V] logits chunk row by row and, where asked,
// overwrites the chunk with d(loss)/d(logits). Every row is computed by one thread
// in a fixed order, so results do not depend on the thread count. The kernels are
// compiled three times (AVX-512, AVX2+FMA, baseline) via target attributes and
// picked once at run time, so the build stays portable.

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "row_math.h"

namespace star {
namespace {

// ---------------------------------------------------------------------------
// CKD
// ---------------------------------------------------------------------------

template <typename T>
struct CkdScratch {
  std::vector<T> bmax;       // per-block maxima of the scaled row
  std::vector<T> heap;       // the m largest values seen (min-heap)
  std::vector<T> copy;       // nth_element scratch (select_algo 1)
  std::vector<int64_t> conf_idx;  // the student's confident set M
  std::vector<int64_t> tie_idx;   // ids whose value equals the m-th largest, ascending
  std::vector<T> conf_e;     // exp(z - max) at M
  std::vector<T> zs;         // scaled logits at the teacher ids
  std::vector<double> gdiv;  // d(divergence) / d(log q_j) at the teacher entries
};

// Pass A: scale by 1/T in place, per-block maxima, and the m-th largest value.
template <typename T>
STAR_INLINE void scale_and_select(T* z, int64_t V, T inv_t, bool scale, int64_t m,
                                  int64_t algo, CkdScratch<T>& s, T& row_max, T& thr) {
  const int64_t nb = V / kBlock;
  const int64_t tail = V - nb * kBlock;
  s.bmax.resize(nb + 1);
  T* bmax = s.bmax.data();
  auto& heap = s.heap;
  heap.clear();
  auto consider = [&](T x) {
    if (static_cast<int64_t>(heap.size()) < m) {
      heap.push_back(x);
      std::push_heap(heap.begin(), heap.end(), std::greater<T>());
    } else if (x > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<T>());
      heap.back() = x;
      std::push_heap(heap.begin(), heap.end(), std::greater<T>());
    }
  };
  T mx = -std::numeric_limits<T>::infinity();
  const bool use_heap = algo == 0;
  for (int64_t b = 0; b < nb; ++b) {
    T* zb = z + b * kBlock;
    if (scale) {
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) zb[j] *= inv_t;
    }
    T bm = block_max(zb);
    bmax[b] = bm;
    mx = bm > mx ? bm : mx;
    if (use_heap && (static_cast<int64_t>(heap.size()) < m || bm > heap.front())) {
      for (int64_t j = 0; j < kBlock; ++j) consider(zb[j]);
    }
  }
  if (tail) {
    T* zb = z + nb * kBlock;
    T bm = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < tail; ++j) {
      if (scale) zb[j] *= inv_t;
      bm = zb[j] > bm ? zb[j] : bm;
      if (use_heap) consider(zb[j]);
    }
    bmax[nb] = bm;
    mx = bm > mx ? bm : mx;
  }
  row_max = mx;
  if (use_heap) {
    if (static_cast<int64_t>(heap.size()) != m) throw std::logic_error("star: internal: heap size");
    thr = heap.front();
  } else {
    s.copy.assign(z, z + V);
    std::nth_element(s.copy.begin(), s.copy.begin() + (m - 1), s.copy.end(), std::greater<T>());
    thr = s.copy[m - 1];
  }
}

// Pass B: record {v : z_v > thr} in conf_idx and {v : z_v == thr} (ascending) in
// tie_idx, overwrite z with e = exp(z - max), return sum e. The caller completes M
// with the lowest tied ids (see admit_ties).
template <typename T>
STAR_INLINE double exp_and_confident(T* z, int64_t V, T mx, T thr, CkdScratch<T>& s) {
  const int64_t nb = V / kBlock;
  const int64_t tail = V - nb * kBlock;
  const T* bmax = s.bmax.data();
  s.conf_idx.clear();
  s.tie_idx.clear();
  double dacc[kBlock] = {};
  for (int64_t b0 = 0; b0 < nb; b0 += kFlushBlocks) {
    const int64_t b1 = std::min(nb, b0 + kFlushBlocks);
    T acc[kBlock] = {};
    for (int64_t b = b0; b < b1; ++b) {
      T* zb = z + b * kBlock;
      if (bmax[b] >= thr) {
        for (int64_t j = 0; j < kBlock; ++j) {
          if (zb[j] > thr) s.conf_idx.push_back(b * kBlock + j);
          else if (zb[j] == thr) s.tie_idx.push_back(b * kBlock + j);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) {
        T e = exp_nonpos(static_cast<T>(zb[j] - mx));
        zb[j] = e;
        acc[j] += e;
      }
    }
    for (int64_t j = 0; j < kBlock; ++j) dacc[j] += static_cast<double>(acc[j]);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kBlock; ++j) sum += dacc[j];
  for (int64_t j = 0; j < tail; ++j) {
    const int64_t v = nb * kBlock + j;
    if (z[v] > thr) s.conf_idx.push_back(v);
    else if (z[v] == thr) s.tie_idx.push_back(v);
    T e = exp_nonpos(static_cast<T>(z[v] - mx));
    z[v] = e;
    sum += static_cast<double>(e);
  }
  return sum;
}

// |M| = m exactly: every id above thr, then the lowest tied ids. Returns the largest
// admitted tied id (-1 when none): v is in M iff z_v > thr or (z_v == thr and v <= it).
template <typename T>
STAR_INLINE int64_t admit_ties(int64_t m, CkdScratch<T>& s) {
  const int64_t admit = std::min<int64_t>(
      m - static_cast<int64_t>(s.conf_idx.size()), static_cast<int64_t>(s.tie_idx.size()));
  if (admit <= 0) return -1;
  s.conf_idx.insert(s.conf_idx.end(), s.tie_idx.begin(), s.tie_idx.begin() + admit);
  return s.tie_idx[admit - 1];
}

// The KD divergence over the teacher entries (kd_type 0 = fkl, 1 = rkl, 2 = akl; see
// _torch_rows.kd_divergence) from fkl and rkl, and in g its derivative in each entry's
// log q_j (0 at padding entries).
template <typename T>
STAR_INLINE double kd_divergence(int64_t kd_type, const T* tlp, const T* zs, int64_t K,
                                 double lse, double fkl, double rkl, std::vector<double>& g) {
  g.assign(K, 0.0);
  double g_head = 0.0, g_tail = 0.0, before = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double lp = static_cast<double>(tlp[j]);
    if (!std::isfinite(lp)) continue;
    const double p = std::exp(lp);
    const double logq = static_cast<double>(zs[j]) - lse;
    const double q = std::exp(logq);
    if (kd_type == 0) {
      g[j] = -p;
    } else if (kd_type == 1) {
      g[j] = q * (logq - lp + 1.0);
    } else {
      const bool head = j == 0 || before < 0.5;
      (head ? g_head : g_tail) += std::abs(p - q);
    }
    before += p;
  }
  if (kd_type == 0) return fkl;
  if (kd_type == 1) return rkl;
  const double total = g_head + g_tail != 0.0 ? g_head + g_tail : 1e-9;
  const double akl = (g_head * fkl + g_tail * rkl) / total;
  before = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double lp = static_cast<double>(tlp[j]);
    if (!std::isfinite(lp)) continue;
    const double p = std::exp(lp);
    const double logq = static_cast<double>(zs[j]) - lse;
    const double q = std::exp(logq);
    const bool head = j == 0 || before < 0.5;
    before += p;
    const double diff = p - q;
    const double sign = diff > 0.0 ? 1.0 : (diff < 0.0 ? -1.0 : 0.0);
    g[j] = (g_tail * q * (logq - lp + 1.0) - g_head * p - sign * q * ((head ? fkl : rkl) - akl))
           / total;
  }
  return akl;
}

template <typename T>
STAR_INLINE void ckd_range_impl(const CkdArgs<T>& a, int64_t begin, int64_t end) {
  CkdScratch<T> s;
  const int64_t V = a.vocab, K = a.k, m = a.topm;
  const double mix = a.mix, lam = a.lam;
  const T inv_t = static_cast<T>(1.0 / a.temperature);
  const bool scale = a.temperature != 1.0;
  const double tiny = static_cast<double>(std::numeric_limits<T>::min());
  s.zs.resize(K);
  for (int64_t r = begin; r < end; ++r) {
    T* z = a.logits + r * V;
    const int64_t* ids = a.ids + r * K;
    const T* tlp = a.tlp + r * K;

    T mx, thr;
    scale_and_select(z, V, inv_t, scale, m, a.select_algo, s, mx, thr);
    for (int64_t j = 0; j < K; ++j) s.zs[j] = z[ids[j]];
    bool keep = false;
    int64_t label = 0;
    double z_label = 0.0;
    if (mix < 1.0) {
      label = a.labels[r];
      keep = label != a.ignore_index;
      if (keep) z_label = static_cast<double>(z[label]);
    }

    const double sum = exp_and_confident(z, V, mx, thr, s);
    const int64_t tie_cut = admit_ties(m, s);
    auto in_m = [&](int64_t j) {
      return s.zs[j] > thr || (s.zs[j] == thr && ids[j] <= tie_cut);
    };
    const double log_sum = std::log(sum);
    const double lse = static_cast<double>(mx) + log_sum;
    const int64_t n_conf = static_cast<int64_t>(s.conf_idx.size());
    s.conf_e.resize(n_conf);
    double conf_e = 0.0;
    for (int64_t i = 0; i < n_conf; ++i) {
      T e = z[s.conf_idx[i]];
      s.conf_e[i] = e;
      conf_e += static_cast<double>(e);
    }

    double teacher_mass = 0.0, student_mass = 0.0, fkl = 0.0, rkl = 0.0, conf_hit = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const double lp = static_cast<double>(tlp[j]);
      if (!std::isfinite(lp)) continue;
      const double p = std::exp(lp);
      const double logq = static_cast<double>(s.zs[j]) - lse;
      const double q = std::exp(logq);
      fkl += p * (lp - logq);
      rkl += q * (logq - lp);
      teacher_mass += p;
      student_mass += q;
      if (in_m(j)) conf_hit += q;
    }
    const double div = kd_divergence(a.kd_type, tlp, s.zs.data(), K, lse, fkl, rkl, s.gdiv);
    double sum_g = 0.0;
    for (int64_t j = 0; j < K; ++j) sum_g += s.gdiv[j];
    const double mistake = conf_e / sum - conf_hit;
    double loss = div + lam * mistake;
    double tail_ratio = 0.0;
    if (a.tail_bucket) {
      const double p_tail = std::max(1.0 - teacher_mass, 0.0);
      const double q_tail = std::max(1.0 - student_mass, tiny);
      loss += xlogy(p_tail, p_tail) - xlogy(p_tail, q_tail);
      tail_ratio = p_tail / q_tail;
    }
    if (mix < 1.0) {
      const double ce = keep ? lse - z_label : 0.0;
      loss = mix * loss + (1.0 - mix) * ce;
    }
    a.loss[r] = static_cast<T>(loss);
    if (a.grad_scale == nullptr) continue;

    // d loss / d u_v = q_v * (dense + lam*mix*[v in M]) + corrections at the teacher
    // ids and the label, with u = z / T (hence the final 1/T folded into s).
    const double sc = static_cast<double>(a.grad_scale[r]) / a.temperature;
    double dense = mix * (-sum_g - lam * mistake - tail_ratio * student_mass);
    if (mix < 1.0 && keep) dense += 1.0 - mix;
    dense *= sc;
    const double conf_extra = mix * lam * sc;
    const T a_dense = static_cast<T>(dense / sum);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] *= a_dense;
    const double a_conf = (dense + conf_extra) / sum;
    for (int64_t i = 0; i < n_conf; ++i)
      z[s.conf_idx[i]] = static_cast<T>(static_cast<double>(s.conf_e[i]) * a_conf);
    for (int64_t j = 0; j < K; ++j) {
      const double lp = static_cast<double>(tlp[j]);
      if (!std::isfinite(lp)) continue;
      const double q = std::exp(static_cast<double>(s.zs[j]) - lse);
      const double hit = in_m(j) ? 1.0 : 0.0;
      const double g = mix * (tail_ratio * q + s.gdiv[j] - lam * q * hit) * sc;
      z[ids[j]] = static_cast<T>(static_cast<double>(z[ids[j]]) + g);
    }
    if (mix < 1.0 && keep)
      z[label] = static_cast<T>(static_cast<double>(z[label]) - (1.0 - mix) * sc);
  }
}

// ---------------------------------------------------------------------------
// Top-k log-probs
// ---------------------------------------------------------------------------

template <typename T>
struct Entry {
  T v;
  int64_t i;
};

// "a ranks before b": larger value, then smaller index.
template <typename T>
STAR_INLINE bool ranks_before(const Entry<T>& a, const Entry<T>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// sum_v exp(x_v / T - mz) with mz = max_v x_v / T, x unmodified.
template <typename T>
STAR_INLINE double sum_exp_scaled(const T* x, int64_t V, T t, bool scale, T mz) {
  const int64_t nb = V / kBlock;
  double dacc[kBlock] = {};
  for (int64_t b0 = 0; b0 < nb; b0 += kFlushBlocks) {
    const int64_t b1 = std::min(nb, b0 + kFlushBlocks);
    T acc[kBlock] = {};
    for (int64_t b = b0; b < b1; ++b) {
      const T* xb = x + b * kBlock;
      if (scale) {
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) acc[j] += exp_nonpos(static_cast<T>(xb[j] / t - mz));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) acc[j] += exp_nonpos(static_cast<T>(xb[j] - mz));
      }
    }
    for (int64_t j = 0; j < kBlock; ++j) dacc[j] += static_cast<double>(acc[j]);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kBlock; ++j) sum += dacc[j];
  for (int64_t v = nb * kBlock; v < V; ++v) {
    const T zv = scale ? static_cast<T>(x[v] / t) : x[v];
    sum += static_cast<double>(exp_nonpos(static_cast<T>(zv - mz)));
  }
  return sum;
}

template <typename T>
STAR_INLINE T row_max(const T* x, int64_t V) {
  const int64_t nb = V / kBlock;
  T mx = -std::numeric_limits<T>::infinity();
  T lanes[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) lanes[j] = mx;
  for (int64_t b = 0; b < nb; ++b) {
    const T* xb = x + b * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) lanes[j] = xb[j] > lanes[j] ? xb[j] : lanes[j];
  }
  for (int64_t j = 0; j < kBlock; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
  for (int64_t v = nb * kBlock; v < V; ++v) mx = x[v] > mx ? x[v] : mx;
  return mx;
}

template <typename T>
STAR_INLINE void topk_range_impl(const TopkArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t V = a.vocab, k = a.k;
  const int64_t nb = V / kBlock;
  const T t = static_cast<T>(a.temperature);
  const bool scale = a.temperature != 1.0;
  std::vector<Entry<T>> heap;
  heap.reserve(k);
  // With ranks_before as the heap's "less", the root is the entry ranked last.
  auto cmp = [](const Entry<T>& x, const Entry<T>& y) { return ranks_before(x, y); };
  auto consider = [&](T x, int64_t i) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back({x, i});
      std::push_heap(heap.begin(), heap.end(), cmp);
    } else if (x > heap.front().v) {  // scanning in index order: ties never rank before
      std::pop_heap(heap.begin(), heap.end(), cmp);
      heap.back() = {x, i};
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  };
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.logits + r * V;
    heap.clear();
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t b = 0; b < nb; ++b) {
      const T* xb = x + b * kBlock;
      const T bm = block_max(xb);
      mx = bm > mx ? bm : mx;
      if (static_cast<int64_t>(heap.size()) < k || bm > heap.front().v)
        for (int64_t j = 0; j < kBlock; ++j) consider(xb[j], b * kBlock + j);
    }
    for (int64_t v = nb * kBlock; v < V; ++v) {
      mx = x[v] > mx ? x[v] : mx;
      consider(x[v], v);
    }
    // Division is monotone, so max(x / T) == max(x) / T exactly.
    const T mz = scale ? static_cast<T>(mx / t) : mx;
    const double lse = static_cast<double>(mz) + std::log(sum_exp_scaled(x, V, t, scale, mz));
    std::sort(heap.begin(), heap.end(), cmp);
    for (int64_t j = 0; j < k; ++j) {
      const T zv = scale ? static_cast<T>(heap[j].v / t) : heap[j].v;
      a.out_ids[r * k + j] = heap[j].i;
      a.out_lp[r * k + j] = static_cast<float>(static_cast<double>(zv) - lse);
    }
  }
}

// ---------------------------------------------------------------------------
// Sampled-token log-probs and entropy
// ---------------------------------------------------------------------------

template <typename T>
STAR_INLINE void logprob_range_impl(const LogprobArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t V = a.vocab;
  const int64_t nb = V / kBlock;
  const T t = static_cast<T>(a.temperature);
  const bool scale = a.temperature != 1.0;
  for (int64_t r = begin; r < end; ++r) {
    T* x = a.logits + r * V;
    const T mx = row_max(x, V);
    const T mz = scale ? static_cast<T>(mx / t) : mx;
    // sum e_v and sum e_v * d_v with d = z - mz, e = exp(d).
    double s0 = 0.0, s1 = 0.0;
    if (a.need_entropy) {
      double d0[kBlock] = {}, d1[kBlock] = {};
      for (int64_t b0 = 0; b0 < nb; b0 += kFlushBlocks) {
        const int64_t b1 = std::min(nb, b0 + kFlushBlocks);
        T acc0[kBlock] = {}, acc1[kBlock] = {};
        for (int64_t b = b0; b < b1; ++b) {
          const T* xb = x + b * kBlock;
#pragma omp simd
          for (int64_t j = 0; j < kBlock; ++j) {
            const T zv = scale ? static_cast<T>(xb[j] / t) : xb[j];
            const T d = static_cast<T>(zv - mz);
            const T e = exp_nonpos(d);
            acc0[j] += e;
            // e * d is 0 * (-inf) = NaN for -inf logits; such terms are 0.
            acc1[j] += e > T(0) ? e * d : T(0);
          }
        }
        for (int64_t j = 0; j < kBlock; ++j) {
          d0[j] += static_cast<double>(acc0[j]);
          d1[j] += static_cast<double>(acc1[j]);
        }
      }
      for (int64_t j = 0; j < kBlock; ++j) {
        s0 += d0[j];
        s1 += d1[j];
      }
      for (int64_t v = nb * kBlock; v < V; ++v) {
        const T zv = scale ? static_cast<T>(x[v] / t) : x[v];
        const T d = static_cast<T>(zv - mz);
        const T e = exp_nonpos(d);
        s0 += static_cast<double>(e);
        if (e > T(0)) s1 += static_cast<double>(e) * static_cast<double>(d);
      }
    } else {
      s0 = sum_exp_scaled(x, V, t, scale, mz);
    }
    const double log_sum = std::log(s0);
    const double lse = static_cast<double>(mz) + log_sum;
    const int64_t tok = a.tokens[r];
    const T z_tok = scale ? static_cast<T>(x[tok] / t) : x[tok];
    a.out_logp[r] = static_cast<T>(static_cast<double>(z_tok) - lse);
    // H = -sum q log q = log_sum - sum(e d) / sum(e).
    const double entropy = a.need_entropy ? log_sum - s1 / s0 : 0.0;
    if (a.out_entropy != nullptr) a.out_entropy[r] = static_cast<T>(entropy);
    if (a.grad_logp == nullptr) continue;

    // g_v = (gl * (onehot - q_v) - ge * q_v * (log q_v + H)) / T, with
    // log q_v = d_v - log_sum: g_v = e_v / sum * (c0 + c1 * d_v) + [v = tok] gl / T.
    const double gl = static_cast<double>(a.grad_logp[r]);
    const double ge = a.grad_entropy ? static_cast<double>(a.grad_entropy[r]) : 0.0;
    const double inv = 1.0 / (a.temperature * s0);
    const T c0 = static_cast<T>((-gl - ge * (entropy - log_sum)) * inv);
    const T c1 = static_cast<T>(-ge * inv);
    if (ge != 0.0) {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const T zv = scale ? static_cast<T>(x[v] / t) : x[v];
        const T d = static_cast<T>(zv - mz);
        const T e = exp_nonpos(d);
        x[v] = e > T(0) ? e * (c0 + c1 * d) : T(0);
      }
    } else {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const T zv = scale ? static_cast<T>(x[v] / t) : x[v];
        x[v] = exp_nonpos(static_cast<T>(zv - mz)) * c0;
      }
    }
    x[tok] = static_cast<T>(static_cast<double>(x[tok]) + gl / a.temperature);
  }
}

// ---------------------------------------------------------------------------
// ISA dispatch: each kernel compiled for AVX-512, AVX2+FMA and the baseline.
// ---------------------------------------------------------------------------

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STAR_X86 1
#define STAR_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512")))
#define STAR_AVX2 __attribute__((target("avx2,fma")))
#else
#define STAR_X86 0
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if STAR_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa current_isa() {
  static const Isa isa = [] {
    const char* force = std::getenv("STAR_KERNELS_CPP_ISA");  // "base", "avx2": for testing
    Isa best = detect_isa();
    if (force != nullptr && std::string(force) == "base") return Isa::kBase;
    if (force != nullptr && std::string(force) == "avx2" && best != Isa::kBase) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

#define STAR_DEFINE_CLONES(NAME, ARGS)                                               \
  template <typename T>                                                              \
  void NAME##_base(const ARGS<T>& a, int64_t b, int64_t e) { NAME##_impl(a, b, e); } \
  STAR_DEFINE_X86_CLONES(NAME, ARGS)                                                 \
  template <typename T>                                                              \
  void NAME(const ARGS<T>& a, int64_t b, int64_t e) {                                \
    switch (current_isa()) {                                                         \
      STAR_X86_CASES(NAME)                                                           \
      default:                                                                       \
        NAME##_base<T>(a, b, e);                                                     \
    }                                                                                \
  }

#if STAR_X86
#define STAR_DEFINE_X86_CLONES(NAME, ARGS)                                                    \
  template <typename T>                                                                       \
  STAR_AVX2 void NAME##_avx2(const ARGS<T>& a, int64_t b, int64_t e) { NAME##_impl(a, b, e); } \
  template <typename T>                                                                       \
  STAR_AVX512 void NAME##_avx512(const ARGS<T>& a, int64_t b, int64_t e) {                    \
    NAME##_impl(a, b, e);                                                                     \
  }
#define STAR_X86_CASES(NAME)    \
  case Isa::kAvx512:            \
    NAME##_avx512<T>(a, b, e);  \
    break;                      \
  case Isa::kAvx2:              \
    NAME##_avx2<T>(a, b, e);    \
    break;
#else
#define STAR_DEFINE_X86_CLONES(NAME, ARGS)
#define STAR_X86_CASES(NAME)
#endif

}  // namespace

STAR_DEFINE_CLONES(ckd_range, CkdArgs)
STAR_DEFINE_CLONES(topk_range, TopkArgs)
STAR_DEFINE_CLONES(logprob_range, LogprobArgs)

template void ckd_range<float>(const CkdArgs<float>&, int64_t, int64_t);
template void ckd_range<double>(const CkdArgs<double>&, int64_t, int64_t);
template void topk_range<float>(const TopkArgs<float>&, int64_t, int64_t);
template void topk_range<double>(const TopkArgs<double>&, int64_t, int64_t);
template void logprob_range<float>(const LogprobArgs<float>&, int64_t, int64_t);
template void logprob_range<double>(const LogprobArgs<double>&, int64_t, int64_t);

const char* isa_name() {
  switch (current_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

}  // namespace star
