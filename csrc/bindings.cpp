// Python bindings of the C++ CPU row ops (star_kernels._C); the kernels are in
// kernels.cpp. Only light ATen headers are included to keep the build quick.
// Inputs are validated and converted in star_kernels/_cpp_rows.py; the checks here
// guard internal invariants only.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace star {
namespace {

template <typename F>
void parallel_rows(int64_t rows, const F& f) {
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) { f(b, e); });
}

void check_rows(const at::Tensor& t, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                  t.size(0) == rows,
              "internal: bad ", name);
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

at::Tensor ckd_rows(at::Tensor logits, at::Tensor ids, at::Tensor tlp,
                    std::optional<at::Tensor> labels, std::optional<at::Tensor> grad_scale,
                    double tail_coef, int64_t topm, double kd_ratio, double temperature,
                    bool tail_bucket, int64_t ignore_index, int64_t select_algo,
                    int64_t kd_type) {
  TORCH_CHECK(logits.dim() == 2, "internal: logits must be [C, V]");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "internal: logits dtype");
  const int64_t C = logits.size(0), V = logits.size(1), K = ids.size(1);
  check_rows(logits, C, dtype, "logits");
  check_rows(ids, C, at::kLong, "teacher_ids");
  check_rows(tlp, C, dtype, "teacher_logprobs");
  TORCH_CHECK(tlp.size(1) == K, "internal: teacher shapes");
  TORCH_CHECK(topm >= 1 && topm <= V, "internal: student_topm out of range");
  TORCH_CHECK(select_algo == 0 || select_algo == 1, "internal: select_algo");
  TORCH_CHECK(kd_type >= 0 && kd_type <= 2, "internal: kd_type");
  TORCH_CHECK(kd_type == 0 || !tail_bucket, "internal: tail_bucket needs kd_type fkl");
  const bool need_labels = kd_ratio < 1.0;
  if (need_labels) {
    TORCH_CHECK(labels.has_value(), "internal: labels needed when kd_ratio < 1");
    check_rows(*labels, C, at::kLong, "labels");
  }
  if (grad_scale.has_value()) check_rows(*grad_scale, C, dtype, "grad_scale");
  auto loss = at::empty({C}, logits.options());
  if (C == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES(dtype, "star_ckd_rows", [&] {
    CkdArgs<scalar_t> a;
    a.logits = logits.data_ptr<scalar_t>();
    a.rows = C;
    a.vocab = V;
    a.ids = ids.data_ptr<int64_t>();
    a.tlp = tlp.data_ptr<scalar_t>();
    a.k = K;
    a.labels = need_labels ? labels->data_ptr<int64_t>() : nullptr;
    a.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<scalar_t>() : nullptr;
    a.loss = loss.data_ptr<scalar_t>();
    a.lam = tail_coef;
    a.mix = kd_ratio;
    a.temperature = temperature;
    a.tail_bucket = tail_bucket;
    a.ignore_index = ignore_index;
    a.topm = topm;
    a.select_algo = select_algo;
    a.kd_type = kd_type;
    parallel_rows(C, [&](int64_t b, int64_t e) { ckd_range<scalar_t>(a, b, e); });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> topk_rows(at::Tensor logits, int64_t k, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "internal: logits must be [C, V]");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "internal: logits dtype");
  const int64_t C = logits.size(0), V = logits.size(1);
  check_rows(logits, C, dtype, "logits");
  TORCH_CHECK(k >= 0 && k <= V, "internal: k out of range");
  auto out_ids = at::empty({C, k}, logits.options().dtype(at::kLong));
  auto out_lp = at::empty({C, k}, logits.options().dtype(at::kFloat));
  if (C == 0 || k == 0) return {out_ids, out_lp};
  AT_DISPATCH_FLOATING_TYPES(dtype, "star_topk_rows", [&] {
    TopkArgs<scalar_t> a;
    a.logits = logits.data_ptr<scalar_t>();
    a.rows = C;
    a.vocab = V;
    a.k = k;
    a.temperature = temperature;
    a.out_ids = out_ids.data_ptr<int64_t>();
    a.out_lp = out_lp.data_ptr<float>();
    parallel_rows(C, [&](int64_t b, int64_t e) { topk_range<scalar_t>(a, b, e); });
  });
  return {out_ids, out_lp};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> logprob_rows(
    at::Tensor logits, at::Tensor tokens, double temperature, bool want_entropy,
    std::optional<at::Tensor> grad_logp, std::optional<at::Tensor> grad_entropy) {
  TORCH_CHECK(logits.dim() == 2, "internal: logits must be [C, V]");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "internal: logits dtype");
  const int64_t C = logits.size(0), V = logits.size(1);
  check_rows(logits, C, dtype, "logits");
  check_rows(tokens, C, at::kLong, "token_ids");
  TORCH_CHECK(V >= 1 || C == 0, "internal: empty vocabulary");
  const bool with_grad = grad_logp.has_value();
  if (with_grad) check_rows(*grad_logp, C, dtype, "grad_logp");
  const bool use_ge = with_grad && grad_entropy.has_value();
  if (use_ge) check_rows(*grad_entropy, C, dtype, "grad_entropy");
  auto logp = at::empty({C}, logits.options());
  std::optional<at::Tensor> entropy;
  if (want_entropy) entropy = at::empty({C}, logits.options());
  if (C > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "star_logprob_rows", [&] {
      LogprobArgs<scalar_t> a;
      a.logits = logits.data_ptr<scalar_t>();
      a.rows = C;
      a.vocab = V;
      a.tokens = tokens.data_ptr<int64_t>();
      a.temperature = temperature;
      a.need_entropy = want_entropy || use_ge;
      a.out_logp = logp.data_ptr<scalar_t>();
      a.out_entropy = want_entropy ? entropy->data_ptr<scalar_t>() : nullptr;
      a.grad_logp = with_grad ? grad_logp->data_ptr<scalar_t>() : nullptr;
      a.grad_entropy = use_ge ? grad_entropy->data_ptr<scalar_t>() : nullptr;
      parallel_rows(C, [&](int64_t b, int64_t e) { logprob_range<scalar_t>(a, b, e); });
    });
  }
  std::optional<at::Tensor> dlogits;
  if (with_grad) dlogits = logits;
  return {logp, entropy, dlogits};
}

}  // namespace
}  // namespace star

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "star_kernels C++ CPU row ops (see star_kernels/_cpp_rows.py)";
  // The kernels run without the GIL (other Python threads, e.g. data loading, go on).
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("ckd_rows", &star::ckd_rows, "CKD per-row loss and in-place gradient", release());
  m.def("topk_rows", &star::topk_rows, "exact top-k log-probs per row", release());
  m.def("logprob_rows", &star::logprob_rows,
        "sampled-token log-probs, entropy, and in-place gradient per row", release());
  m.def("isa", [] { return std::string(star::isa_name()); }, "the instruction set the row kernels dispatched to");
}
